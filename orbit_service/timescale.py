"""One skyfield timescale per process, from the leap-second table bundled with skyfield (no download)."""

from __future__ import annotations

from datetime import datetime, timezone
from functools import cache
from typing import Any

from skyfield.api import load


@cache
def timescale() -> Any:
    return load.timescale(builtin=True)


def to_time(moment: datetime) -> Any:
    """A skyfield `Time` for an aware (or UTC-naive) datetime."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return timescale().from_datetime(moment)


def to_datetime(t: Any) -> datetime:
    """An aware UTC datetime for a scalar skyfield `Time`."""
    moment: datetime = t.utc_datetime()
    return moment
