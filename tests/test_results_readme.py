"""The README's Results section is what testbed/results_readme.py generates from the committed comparisons."""

from __future__ import annotations

import copy

from testbed import results_readme


def test_committed_results_section_equals_the_regenerated_one() -> None:
    readme = results_readme.README.read_text(encoding="utf-8")
    results = results_readme.load_results()
    assert len(results) >= 2  # the synthetic task and Banking77
    fresh = results_readme.splice(readme, results_readme.render(results))
    assert fresh == readme, "README.md's Results differ from the JSON: run python -m testbed.results_readme --write"


def test_the_section_follows_the_figures() -> None:
    """A changed figure changes the section (it is generated, not typed)."""
    results = results_readme.load_results()
    section = results_readme.render(results)
    assert "| EMS-FL |" in section and "Centralised (reference)" in section and "Reproduce:" in section
    clinc = results["clinc150"]["by_rate"]["10Mbps"]["strategies"]
    emsfl, fedavg = clinc["emsfl"]["final_accuracy"]["mean"], clinc["fedavg"]["final_accuracy"]["mean"]
    assert f"CLINC150: EMS-FL {emsfl:.3f} against FedAvg {fedavg:.3f} final accuracy" in section
    below, above = copy.deepcopy(results), copy.deepcopy(results)
    for low, high in zip(below.values(), above.values(), strict=True):
        for comparison in low["by_rate"].values():
            comparison["strategies"]["emsfl"]["final_accuracy"]["mean"] = 0.0
        for comparison in high["by_rate"].values():
            comparison["strategies"]["emsfl"]["final_accuracy"]["mean"] = 0.99
    assert "EMS-FL ends below FedAvg in final accuracy on every committed experiment" in results_readme.render(below)
    assert "EMS-FL ends below FedAvg" not in results_readme.render(above)


def test_a_difference_within_the_seeds_spread_is_called_so() -> None:
    results = copy.deepcopy(results_readme.load_results())
    acc = results["clinc150"]["by_rate"]["10Mbps"]["strategies"]
    acc["emsfl"]["final_accuracy"].update(mean=0.40, std=0.01, values=[0.39, 0.40, 0.41])
    acc["fedavg"]["final_accuracy"].update(mean=0.38, std=0.05, values=[0.33, 0.38, 0.43])
    assert "0.400 against FedAvg 0.380 final accuracy (within the spread over seeds, ± 0.050)" in (
        results_readme.render(results)
    )
    acc["emsfl"]["final_accuracy"].update(mean=0.50)
    assert "0.500 against FedAvg 0.380 final accuracy." in results_readme.render(results)
