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
    assert "EMS-FL ends below FedAvg" in section  # as measured (see benchmarks/results/experiments/)
    changed = copy.deepcopy(results)
    for result in changed.values():
        for comparison in result["by_rate"].values():
            comparison["strategies"]["emsfl"]["final_accuracy"]["mean"] = 0.99
    assert "EMS-FL ends below FedAvg" not in results_readme.render(changed)
