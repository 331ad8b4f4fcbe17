"""Converts world-atlas's `land-110m.json` (TopoJSON of Natural Earth's 1:110m land, npm package `world-atlas`,
ISC licence, `static/vendor/world-atlas-LICENSE.txt`) once into `static/vendor/land-110m.json`: one SVG path in
the page's equirectangular frame (x = lon + 180, y = 90 - lat, 0.1 degree precision). Run by hand when updating:

    npm pack world-atlas@2 && tar xzf world-atlas-2.*.tgz
    python -m testbed.dashboard.vendor_land package/land-110m.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "static" / "vendor" / "land-110m.json"


def _arcs(topology: dict[str, Any]) -> list[list[tuple[float, float]]]:
    """Absolute lon/lat points of every arc (TopoJSON quantised, delta-encoded arcs)."""
    (sx, sy), (tx, ty) = topology["transform"]["scale"], topology["transform"]["translate"]
    out = []
    for arc in topology["arcs"]:
        x = y = 0
        points = []
        for dx, dy in arc:
            x, y = x + dx, y + dy
            points.append((x * sx + tx, y * sy + ty))
        out.append(points)
    return out


def _ring(arcs: list[list[tuple[float, float]]], indices: list[int]) -> list[tuple[float, float]]:
    points: list[tuple[float, float]] = []
    for i in indices:
        arc = arcs[i] if i >= 0 else arcs[~i][::-1]
        points += arc[1:] if points else arc  # consecutive arcs share their end point
    return points


def land_path(topology: dict[str, Any]) -> str:
    arcs = _arcs(topology)
    parts = []
    for geometry in topology["objects"]["land"]["geometries"]:
        polygons = geometry["arcs"] if geometry["type"] == "MultiPolygon" else [geometry["arcs"]]
        for polygon in polygons:
            for ring in polygon:
                parts.append(_ring_path(_ring(arcs, ring)))
    return "".join(parts)


def _ring_path(points: list[tuple[float, float]]) -> str:
    """A closed subpath; a ring that jumps across the antimeridian is broken there instead of drawing a line
    across the whole map."""
    out: list[str] = []
    previous: float | None = None
    crosses = False
    for lon, lat in points:
        jump = previous is not None and abs(lon - previous) > 180
        crosses = crosses or jump
        out.append(("M" if previous is None or jump else "L") + f"{lon + 180:.1f} {90 - lat:.1f}")
        previous = lon
    return "".join(out) + ("" if crosses else "Z")


def main(argv: list[str]) -> int:
    topology = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    document = {
        "source": "world-atlas 2.0.2 land-110m.json (Natural Earth 1:110m land), ISC licence",
        "frame": "equirectangular: x = lon + 180, y = 90 - lat (viewBox 0 0 360 180)",
        "d": land_path(topology),
    }
    OUT.write_text(json.dumps(document, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"{OUT}: {OUT.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
