"""24-hour plan of a 1,584-satellite Walker shell (72 x 22, 53 deg, 550 km) over 100 sites at 10 deg.

Writes benchmarks/results/orbit_plan.json: `fast_s` (the whole `build_plan(method="fast")` as `emsfl orbit plan` and
`emsfl orbit run` call it: ephemeris, contacts, merged windows, highest-elevation selection with handovers and
their geometry), `fast_contacts_s` (contacts only, as columns), `export_contacts_s` (building every `Contact` and
the CLI's sorted contact list, which `--format json|csv` then prints), `reference_s` (skyfield `find_events` per
pair, timed on `pairs_checked` random pairs and extrapolated to every pair), `speedup` (reference_s / fast_s),
`max_abs_error_s` (AOS/LOS, fast vs reference, on the sample).
Run: .venv/bin/python benchmarks/bench_orbit_plan.py [--pairs N]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import write_result

from orbit_service.constellation import WalkerSpec, walker_satellites
from orbit_service.contacts import satellite_contacts
from orbit_service.ephemeris import WORKERS
from orbit_service.fast import fast_contact_table
from orbit_service.plan import build_plan
from orbit_service.sites import GroundSite

START = datetime(2026, 3, 20, 0, 0, tzinfo=timezone.utc)
HOURS = 24.0
OUT = Path(__file__).resolve().parent / "results" / "orbit_plan.json"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--sites", type=int, default=100)
    args = parser.parse_args()
    load_start = round(os.getloadavg()[0], 2)
    rng = random.Random(0)
    end = START + timedelta(hours=HOURS)
    sats = walker_satellites(WalkerSpec(53.0, 550.0, 72, 22, 1), START)
    sites = {
        f"site{i:03d}": GroundSite(f"site{i:03d}", rng.uniform(-60.0, 60.0), rng.uniform(-180.0, 180.0), 0.0, 10.0)
        for i in range(args.sites)
    }
    t0, c0 = time.perf_counter(), time.process_time()
    plan = build_plan(sites, sats, START, end, method="fast")
    fast_s, fast_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    load_after_fast = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    everything = plan.all_contacts()  # what `emsfl orbit plan` exports
    export_s = time.perf_counter() - t0
    contacts = {key: plan.contacts[key] for key in sites}
    del everything
    t0, c0 = time.perf_counter(), time.process_time()
    fast_contact_table(sites, sats, START, end)
    fast_contacts_s, fast_contacts_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    by_name = {s.name: s for s in sats}
    pairs = [(rng.choice(list(sites)), rng.choice(sats).name) for _ in range(args.pairs)]
    errors: list[float] = []
    mismatched = 0
    t0 = time.perf_counter()
    refs = [satellite_contacts(sites[k], by_name[s], START, end) for k, s in pairs]
    ref_sample_s = time.perf_counter() - t0
    for (key, sat), ref in zip(pairs, refs, strict=True):
        mine = [c for c in contacts[key] if c.satellite == sat]
        if len(mine) != len(ref):
            mismatched += 1
        for r in ref:
            near = [c for c in mine if c.aos < r.los and r.aos < c.los]
            if near:
                errors += [abs((near[0].aos - r.aos).total_seconds()), abs((near[0].los - r.los).total_seconds())]
    all_pairs = len(sites) * len(sats)
    reference_s = ref_sample_s / len(pairs) * all_pairs
    result = {
        "scenario": f"Walker 53:550:72/22/1 ({len(sats)} satellites), {len(sites)} sites, {HOURS:g} h, 10 deg mask",
        "fast_s": round(fast_s, 3),
        "fast_cpu_s": round(fast_cpu_s, 3),
        "fast_includes": (
            "build_plan(method='fast'): SGP4 ephemeris, contacts of every (site, satellite), merged windows, "
            "highest-elevation serving satellite, handovers and their geometry"
        ),
        "fast_contacts_s": round(fast_contacts_s, 3),
        "fast_contacts_cpu_s": round(fast_contacts_cpu_s, 3),
        "reference_s": round(reference_s, 1),
        "reference_note": (
            f"skyfield find_events timed on {len(pairs)} random (site, satellite) pairs ({ref_sample_s:.2f} s) "
            f"and extrapolated to all {all_pairs} pairs"
        ),
        "export_contacts_s": round(export_s, 3),
        "speedup": round(reference_s / fast_s, 1),
        "max_abs_error_s": round(max(errors), 4) if errors else None,
        "pairs_checked": len(pairs),
        "passes_compared": len(errors) // 2,
        "pairs_with_count_mismatch": mismatched,
        "contacts": sum(len(v) for v in contacts.values()),
        "windows": sum(len(v) for v in plan.windows.values()),
        "handovers": sum(len(w.handovers) for v in plan.windows.values() for w in v),
        "cpus": os.cpu_count(),
        "threads": min(WORKERS, os.cpu_count() or 1),
        "load_avg_1m_at_start": load_start,
        "load_avg_1m_after_fast": load_after_fast,
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "timing_note": (
            "wall seconds on a 2-core machine shared with other jobs; *_cpu_s is this process's CPU time (all its "
            "threads: groups of sites run on `threads` threads)"
        ),
    }
    write_result(OUT, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
