"""Exact expert assignment of ARCHITECTURE §4.2.

Per layer l: choose disjoint S_c with |S_c| <= K_c maximising sum_c w_c * sum_{e in S_c} A_c[l, e],
w_c = n_c / sum n. Each cluster c contributes K_c identical "slots"; an expert (row) matched to a slot
of c is owned by c. With non-negative affinities a maximum-weight full matching of the E x sum(K_c)
matrix is also optimal among partial ones, so `linear_sum_assignment` solves it exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment

AFFINITY_KINDS = ("gate", "freq")

# cluster -> per layer, the sorted experts it owns
Assignment = dict[str, list[list[int]]]


def cluster_weights(num_examples: Mapping[str, int]) -> dict[str, float]:
    """w_c = n_c / sum n; equal weights when no cluster has reported any data."""
    total = sum(num_examples.values())
    if total <= 0:
        return {c: 1.0 / len(num_examples) for c in num_examples}
    return {c: n / total for c, n in num_examples.items()}


def solve_assignment(
    affinities: Mapping[str, np.ndarray],
    capacities: Mapping[str, int],
    num_examples: Mapping[str, int],
) -> Assignment:
    """The optimal assignment; a pure function of its inputs (clusters are taken in sorted id order).

    `affinities[c]` is the L x E matrix A_c (non-negative), `capacities[c]` is K_c >= 0, `num_examples[c]` is n_c.
    """
    clusters = sorted(affinities)
    if not clusters:
        raise ValueError("no clusters to assign")
    if set(capacities) != set(clusters) or set(num_examples) != set(clusters):
        raise ValueError("affinities, capacities and num_examples must name the same clusters")
    shapes = {np.shape(affinities[c]) for c in clusters}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"affinity matrices must all be L x E, got shapes {sorted(shapes)}")
    num_layers, num_experts = next(iter(shapes))
    if any(capacities[c] < 0 for c in clusters):
        raise ValueError("capacities must be >= 0")
    weights = cluster_weights({c: num_examples[c] for c in clusters})
    # More than E slots of one cluster can never be used; clipping keeps the matrix small.
    slot_owner = [i for i, c in enumerate(clusters) for _ in range(min(capacities[c], num_experts))]
    result: Assignment = {c: [[] for _ in range(num_layers)] for c in clusters}
    if not slot_owner:
        return result
    owner_index = np.asarray(slot_owner)
    stacked = np.stack([np.asarray(affinities[c], dtype=np.float64) * weights[c] for c in clusters])  # C x L x E
    for layer in range(num_layers):
        profit = stacked[owner_index, layer, :].T  # E x slots
        rows, cols = linear_sum_assignment(profit, maximize=True)
        for expert, slot in zip(rows.tolist(), cols.tolist(), strict=True):
            result[clusters[slot_owner[slot]]][layer].append(expert)
        for c in clusters:
            result[c][layer].sort()
    return result


def objective(assignment: Assignment, affinities: Mapping[str, np.ndarray], num_examples: Mapping[str, int]) -> float:
    """sum over layers and clusters of w_c * sum_{e in S_c,l} A_c[l, e]."""
    weights = cluster_weights(num_examples)
    total = 0.0
    for c, layers in assignment.items():
        matrix = np.asarray(affinities[c], dtype=np.float64)
        for layer, experts in enumerate(layers):
            total += weights[c] * float(matrix[layer, experts].sum()) if experts else 0.0
    return total


def owners(assignment: Assignment) -> dict[tuple[int, int], str]:
    """(layer, expert) -> owning cluster."""
    return {(layer, e): c for c, layers in assignment.items() for layer, experts in enumerate(layers) for e in experts}
