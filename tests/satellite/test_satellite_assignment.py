"""The assignment of ARCHITECTURE §4.2 is exact: compared with brute force on small random instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from satellite_node.assignment import cluster_weights, objective, owners, solve_assignment


def brute_force(affinities: dict[str, np.ndarray], caps: dict[str, int], n: dict[str, int]) -> float:
    clusters = sorted(affinities)
    w = cluster_weights(n)
    num_layers, num_experts = next(iter(affinities.values())).shape
    total = 0.0
    for layer in range(num_layers):
        best = 0.0
        # every expert goes to one cluster or to none
        for choice in itertools.product([None, *clusters], repeat=num_experts):
            if any(sum(1 for o in choice if o == c) > caps[c] for c in clusters):
                continue
            value = sum(w[o] * affinities[o][layer, e] for e, o in enumerate(choice) if o is not None)
            best = max(best, value)
        total += best
    return total


@pytest.mark.parametrize("seed", range(40))
def test_optimal_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_clusters = int(rng.integers(1, 4))
    num_experts = int(rng.integers(2, 6))
    num_layers = int(rng.integers(1, 3))
    clusters = [f"c{i}" for i in range(num_clusters)]
    affinities = {c: rng.random((num_layers, num_experts)) for c in clusters}
    # capacities from 0 up to more than E: some instances under-cover the experts, others over-cover
    caps = {c: int(rng.integers(0, num_experts + 2)) for c in clusters}
    n = {c: int(rng.integers(0, 1000)) for c in clusters}
    result = solve_assignment(affinities, caps, n)
    assert objective(result, affinities, n) == pytest.approx(brute_force(affinities, caps, n), abs=1e-9)
    for layer in range(num_layers):
        held = [e for c in clusters for e in result[c][layer]]
        assert len(held) == len(set(held)), "experts must have at most one owner"
        for c in clusters:
            assert len(result[c][layer]) <= caps[c]
        if sum(caps.values()) >= num_experts:
            assert sorted(held) == list(range(num_experts)), "enough capacity: every expert has an owner"
        else:
            assert len(held) == sum(caps.values())


def test_weights_follow_data_size() -> None:
    # both clusters want expert 0 most; the one with more data wins it
    affinities = {"a": np.array([[0.9, 0.1]]), "b": np.array([[0.8, 0.2]])}
    result = solve_assignment(affinities, {"a": 1, "b": 1}, {"a": 10, "b": 1000})
    assert result == {"a": [[1]], "b": [[0]]}
    result = solve_assignment(affinities, {"a": 1, "b": 1}, {"a": 1000, "b": 10})
    assert result == {"a": [[0]], "b": [[1]]}


def test_deterministic_and_owner_table() -> None:
    rng = np.random.default_rng(7)
    affinities = {c: rng.random((3, 8)) for c in ("c2", "c0", "c1")}
    caps = {"c0": 3, "c1": 3, "c2": 3}
    n = {"c0": 5, "c1": 5, "c2": 5}
    first = solve_assignment(affinities, caps, n)
    assert solve_assignment(dict(reversed(list(affinities.items()))), caps, n) == first
    table = owners(first)
    assert len(table) == 3 * 8
    assert all(table[(layer, e)] == c for c, layers in first.items() for layer, es in enumerate(layers) for e in es)


def test_zero_capacity_and_zero_data() -> None:
    affinities = {"a": np.ones((1, 3)), "b": np.ones((1, 3))}
    assert solve_assignment(affinities, {"a": 0, "b": 0}, {"a": 0, "b": 0}) == {"a": [[]], "b": [[]]}
    result = solve_assignment(affinities, {"a": 0, "b": 5}, {"a": 0, "b": 0})
    assert result == {"a": [[]], "b": [[0, 1, 2]]}


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        solve_assignment({}, {}, {})
    with pytest.raises(ValueError):
        solve_assignment({"a": np.ones((1, 2)), "b": np.ones((1, 3))}, {"a": 1, "b": 1}, {"a": 1, "b": 1})
    with pytest.raises(ValueError):
        solve_assignment({"a": np.ones((1, 2))}, {"a": -1}, {"a": 1})
