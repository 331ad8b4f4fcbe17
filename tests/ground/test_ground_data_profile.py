from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest

from emsfl.config import ConfigError
from ground_node.learning.profile import coverage_from_probs, profile_affinity
from ground_node.learning.synthetic import (
    cluster_test,
    cluster_train,
    encode_train,
    global_test,
)
from ground_node.learning.tokenizer import CharTokenizer
from ground_node.model.base import new_model
from ground_node.records import Assignment
from ground_node.settings import load_settings


def test_synthetic_is_deterministic_and_correct(topology: dict[str, Any]) -> None:
    s = load_settings(topology)
    a, b = cluster_train(s, "c1"), cluster_train(s, "c1")
    assert a == b and a != cluster_train(s, "c0")
    for ex in a[:50]:
        body = ex.prompt[2:-1]
        if ex.domain == "copy":
            assert ex.answer == body
        elif ex.domain == "reverse":
            assert ex.answer == body[::-1]
        elif ex.domain == "sort":
            assert ex.answer == "".join(sorted(body))
        else:
            x, y = body.split("+")
            assert ex.answer == str(int(x) + int(y))
    ids, labels = encode_train(CharTokenizer(), a[:4])
    assert ids.shape == labels.shape
    tok = CharTokenizer()
    for row, lab, ex in zip(ids.tolist(), labels.tolist(), a[:4], strict=True):
        answer_ids = [t for t in lab if t != -100]
        assert tok.decode(answer_ids) == ex.answer and answer_ids[-1] == tok.eos_id
        assert tok.decode(row[1 : 1 + len(ex.prompt)]) == ex.prompt


def test_non_iid_split_and_test_mixes(topology: dict[str, Any]) -> None:
    s = load_settings(topology)
    domains = s.data.domains
    for i, cluster in enumerate(s.clusters):
        counts = Counter(ex.domain for ex in cluster_train(s, cluster))
        assert sum(counts.values()) == 200
        assert counts[domains[i % len(domains)]] == 140
        assert all(counts[d] in (20, 21, 19) for d in domains if d != domains[i % len(domains)])
        tcounts = Counter(ex.domain for ex in cluster_test(s, cluster))
        assert tcounts[domains[i % len(domains)]] == 28 and sum(tcounts.values()) == 40
    assert Counter(ex.domain for ex in global_test(s)) == dict.fromkeys(domains, 10)


def test_bad_data_config_is_refused(topology: dict[str, Any]) -> None:
    for key, value, match in [
        ("train_per_cluster", 0, "data.train_per_cluster"),
        ("domains", ["copy", "poetry"], "poetry"),
        ("dominant_share", 1.5, "dominant_share"),
        ("domains", [], "data.domains"),
    ]:
        bad = dict(topology, data=dict(topology["data"], **{key: value}))
        with pytest.raises(ConfigError, match=match):
            load_settings(bad)
    with pytest.raises(ConfigError, match="no cluster"):
        cluster_train(load_settings(topology), "nope")


def test_step_budgets_per_cluster(topology: dict[str, Any]) -> None:
    clusters = [dict(c) for c in topology["clusters"]]
    clusters[0]["max_training_steps"] = 40
    s = load_settings(dict(topology, clusters=clusters))
    assert s.step_budgets == {clusters[0]["id"]: 40}
    assert s.training.send_window_chunks == 1
    bad_window = dict(topology, training=dict(topology["training"], send_window_chunks=0))
    with pytest.raises(ConfigError, match=r"training\.send_window_chunks"):
        load_settings(bad_window)
    clusters[0]["max_training_steps"] = -1
    with pytest.raises(ConfigError, match=r"clusters\[0\]\.max_training_steps"):
        load_settings(dict(topology, clusters=clusters))


def test_profile_deterministic_rows_sum_and_coverage(topology: dict[str, Any]) -> None:
    s = load_settings(topology)
    model, adapter = new_model(s)
    data = cluster_train(s, "c0")
    tok = CharTokenizer()
    aff1, probs = profile_affinity(model, adapter, data, tok, 32)
    aff2, _ = profile_affinity(model, adapter, data, tok, 32)
    assert np.array_equal(aff1.gate, aff2.gate) and np.array_equal(aff1.freq, aff2.freq)
    assert aff1.gate.shape == (2, 4) and aff1.num_tokens > 32
    assert np.allclose(aff1.gate.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(aff1.freq.sum(axis=1), 1.0, atol=1e-6)
    full = Assignment(1, {0: (0, 1, 2, 3), 1: (0, 1, 2, 3)})
    assert coverage_from_probs(probs, 2, full) == pytest.approx(1.0)
    assert coverage_from_probs(probs, 2, Assignment(1, {})) == 0.0
    half = coverage_from_probs(probs, 2, Assignment(1, {0: (0, 1), 1: (0, 1)}))
    other = coverage_from_probs(probs, 2, Assignment(1, {0: (2, 3), 1: (2, 3)}))
    assert half + other == pytest.approx(1.0)
    with pytest.raises(ValueError, match="empty"):
        profile_affinity(model, adapter, [], tok, 32)
