"""`comparison.md` in plain language, from `comparison.json` alone (so a committed one can be regenerated).

`python -m testbed.comparemd X.comparison.json [...]` rewrites `X.comparison.md` beside each file; `--check`
only reports the ones that differ. The number of seeds is stated, a single seed shows its value (no `± 0`),
and each claim of EMS-FL against FedAvg is one sentence with a yes or no.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from testbed.style import method_name

ORDER = ("emsfl", "fedavg", "fedasync")


def rate_label(rate_bps: float) -> str:
    """The key of a link rate in `by_rate` (as testbed/experiment.py writes it)."""
    return f"{rate_bps / 1e6:g}Mbps"


def ordered_rates(result: dict[str, Any]) -> list[float]:
    """The headline rate (`link_rate_bps`) first, then the others from fastest to slowest."""
    first = float(result.get("link_rate_bps") or max(result["rates_bps"]))
    others = sorted((float(r) for r in result["rates_bps"] if float(r) != first), reverse=True)
    return [first, *others]


def ordered_strategies(strategies: dict[str, Any]) -> list[str]:
    return [s for s in ORDER if s in strategies] + sorted(s for s in strategies if s not in ORDER)


def fmt(metric: dict[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    """`mean ± std` over seeds; one seed: its value alone; runs that never reached a value are counted."""
    if not metric or metric.get("mean") is None:
        return "not reached" if metric else "—"
    values = metric.get("values") or []
    text = f"{metric['mean'] / scale:.{digits}f}"
    if len(values) > 1:
        text += f" ± {metric['std'] / scale:.{digits}f}"
    missing = int(metric.get("missing") or 0)
    if missing:
        text += f" ({missing} of {missing + len(values)} not reached)"
    return text


def yes_no(value: bool | None) -> str:
    return "not measured" if value is None else ("yes" if value else "no")


def claim_sentences(comparison: dict[str, Any], seeds: int) -> list[str]:
    """The three claims of EMS-FL against FedAvg, each a plain sentence ending in yes or no, with the figure."""
    c = comparison.get("claims_vs_fedavg") or {}
    strategies = comparison.get("strategies") or {}
    if not c or "emsfl" not in strategies or "fedavg" not in strategies:
        return []
    e, f = strategies["emsfl"], strategies["fedavg"]
    speedup = c.get("time_to_target_speedup_vs_fedavg")
    e_hit, f_hit = int(c.get("emsfl_reached_target_runs") or 0), int(c.get("fedavg_reached_target_runs") or 0)
    if speedup is not None:
        how = f"{speedup:.1f}× sooner" if speedup >= 1 else f"{1 / speedup:.1f}× later"
        why = f"EMS-FL reached it {how}"
    else:
        why = f"EMS-FL reached it in {e_hit} of {seeds} seeds, FedAvg in {f_hit} of {seeds}"
    sooner = yes_no(c.get("reaches_target_2x_sooner"))
    lines = [f"- EMS-FL reached the target at least 2× sooner than FedAvg: {sooner} ({why})."]
    diff = c.get("final_accuracy_minus_fedavg")
    if diff is not None:
        acc_e, acc_f = e["final_accuracy"]["mean"], f["final_accuracy"]["mean"]
        side = "higher" if diff > 0 else "lower" if diff < 0 else "equal"
        detail = f"{abs(diff):.3f} {side}: {acc_e:.3f} against {acc_f:.3f}" if diff else f"both {acc_e:.3f}"
        lines.append(
            f"- EMS-FL's final accuracy is at least FedAvg's: {yes_no(c.get('final_accuracy_not_below_fedavg'))}"
            f" ({detail})."
        )
    served = c.get("served_accuracy_minus_fedavg")
    if served is not None:
        s_e, s_f = e["served_accuracy"]["mean"], f["served_accuracy"]["mean"]
        lines.append(
            f"- What the boards serve (mean over clusters): EMS-FL {s_e:.3f}, FedAvg {s_f:.3f}"
            f" ({'higher' if served > 0 else 'lower' if served < 0 else 'equal'} for EMS-FL)."
        )
    ratio, clusters = c.get("uplink_ratio_vs_fedavg"), c.get("C")
    if ratio is not None and clusters:
        lines.append(
            f"- EMS-FL sent at most 1/C = 1/{clusters} of FedAvg's uplink bytes:"
            f" {yes_no(c.get('uplink_at_most_1_over_C'))} ({ratio:.2f} of them)."
        )
    return lines


def table(comparison: dict[str, Any], rate_bps: float) -> list[str]:
    strategies = comparison["strategies"]
    lines = [
        f"### Link rate {rate_bps / 1e6:g} Mbit/s (target accuracy {comparison['target_accuracy']:.3f},"
        " mean over seeds)",
        "",
        "| method | time to target (emulated h) | final accuracy | mean cluster accuracy | served accuracy "
        "| uplink (MB) | downlink (MB) | device-hours | peak memory (MB) | idle waiting (emulated h) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ordered_strategies(strategies):
        m = strategies[name]
        lines.append(
            f"| {method_name(name)} | {fmt(m['time_to_target_s'], 3600.0, 2)} | {fmt(m['final_accuracy'])} "
            f"| {fmt(m['final_accuracy_cluster_mean'])} | {fmt(m.get('served_accuracy'))} "
            f"| {fmt(m['uplink_bytes'], 1e6, 2)} "
            f"| {fmt(m['downlink_bytes'], 1e6, 2)} | {fmt(m['device_hours'], 1.0, 4)} "
            f"| {fmt(m['peak_device_memory_mb'], 1.0, 0)} | {fmt(m['idle_waiting_s'], 3600.0, 2)} |"
        )
    central = comparison.get("centralised")
    if central:
        lines.append(
            f"| {method_name('centralised')} (reference) | — | {fmt(central['final_accuracy'])} "
            f"| {fmt(central['final_accuracy_cluster_mean'])} | {fmt(central['final_accuracy_cluster_mean'])} "
            f"| — | — | {fmt(central['device_hours'], 1.0, 4)} "
            f"| {fmt(central['peak_device_memory_mb'], 1.0, 0)} | — |"
        )
    return lines


def render(result: dict[str, Any]) -> str:
    """The whole comparison.md of an experiment."""
    seeds = list(result["seeds"])
    n = len(seeds)
    plan = result["contact_plan"]
    spread = (
        f"Values are the mean ± sample standard deviation over the {n} seeds."
        if n > 1
        else "One seed: each value is that run's (no spread)."
    )
    same = plan.get("identical_across_runs")
    same_plan = "the same contact plan in every run" if same else "contact plans that differ between runs"
    head = [
        f"# Experiment {result['experiment_id']}",
        "",
        f"Task `{result['task']}` (topology `{result.get('topology', '?')}`), {n} seed{'s' if n != 1 else ''}"
        f" ({', '.join(str(s) for s in seeds)}), {result['duration_wall_s_per_run']:g} wall seconds per run,"
        f" {same_plan}: {plan['how']}. {spread} The target is {result['target_rule']}. Time to target and idle"
        " waiting are emulated hours; device-hours are wall compute time of training. Final accuracy is the"
        " global model's on the global test sample, mean cluster accuracy the global model's on each cluster's"
        " test mix; served accuracy is what each cluster's board answers on its mix with the model it holds"
        " (EMS-FL: its sub-model; FedAvg and FedAsync: the newest global model it loaded), averaged over"
        f" clusters. Total wall time {result['wall_seconds']:.0f} s.",
        "",
    ]
    body: list[str] = []
    for rate in ordered_rates(result):
        comparison = result["by_rate"][rate_label(rate)]
        body += table(comparison, rate)
        claims = claim_sentences(comparison, n)
        if claims:
            body += ["", "EMS-FL against FedAvg at this rate:", "", *claims]
        body.append("")
    return "\n".join(head + body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.comparemd", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="X.comparison.json files (each gives X.comparison.md)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a .md differs")
    args = parser.parse_args(argv)
    stale = []
    for path in args.files:
        out = path.with_name(path.name.removesuffix(".json") + ".md")
        text = render(json.loads(path.read_text(encoding="utf-8")))
        if args.check:
            if not out.exists() or out.read_text(encoding="utf-8") != text:
                stale.append(str(out))
        else:
            out.write_text(text, encoding="utf-8")
            print(out)
    for name in stale:
        print(f"{name}: differs from its JSON (regenerate with python -m testbed.comparemd)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
