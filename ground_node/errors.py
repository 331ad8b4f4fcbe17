"""Errors of the ground role that are not configuration errors (those are `emsfl.config.ConfigError`)."""

from __future__ import annotations

from emsfl.errors import UserError


class GroundError(UserError):
    """Bad input to the ground role (a checkpoint of another family, an impossible assignment, ...)."""
