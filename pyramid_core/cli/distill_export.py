"""``pyramid distill export``: a trained EAGLE-3 head as a ``speculators`` checkpoint, the format
vLLM's EAGLE-3 path serves (``backends.hf.speculators``; [serving with
vLLM](../../serving.md#eagle-3-heads-in-the-speculators-format)).

    pyramid distill export HEAD_DIR --out DIR [--k 3] [--verifier ID] [--dtype float16]

The folder works both ways: vLLM loads it (``speculative_config={"method": "eagle3", "model":
DIR}``) and pyramid reads it back as a stage (``feature:path=DIR``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from pyramid_core.cli.argtypes import int_at_least
from pyramid_core.errors import ConfigError

__all__ = ["configure"]

DTYPES = ("float16", "bfloat16", "float32")


def configure(x: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    x.add_argument("head", metavar="HEAD_DIR", help="a feature head trained by `pyramid distill feature --variant eagle3`")
    x.add_argument("--out", required=True, metavar="DIR", help="the speculators folder to write")
    x.add_argument("--k", type=int_at_least(1), default=3, help="speculative tokens vLLM proposes by default (3)")
    x.add_argument("--verifier", metavar="ID",
                   help="the target as the checkpoint names it (default: the head's base model directory)")
    x.add_argument("--dtype", choices=DTYPES, default=None, help="of the weights (default: as the head stores them)")
    return run


def run(ns: argparse.Namespace) -> int:
    import torch

    from pyramid_core.backends.hf.head import feature_base, is_feature_dir, load_feature_head
    from pyramid_core.backends.hf.loading import load_model
    from pyramid_core.backends.hf.speculators import export_speculators
    from pyramid_core.lab.outputs import output_dir

    head_dir = Path(ns.head).expanduser()
    if not is_feature_dir(head_dir):
        raise ConfigError(f"pyramid distill export: {ns.head} holds no feature head (no stage.json of format "
                          "pyramid-feature-stage/1)")
    out = output_dir(ns.out, "--out")
    if any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} is not empty; give a new folder")
    try:
        base_dir = feature_base(head_dir)
        base = load_model(base_dir, dtype="float32")
        head = load_feature_head(head_dir, base)
        info = json.loads((head_dir / "stage.json").read_text())
        dtype = getattr(torch, ns.dtype or info.get("dtype", "float16"))
        recorded = str(info["base"])  # "smollm2" stays portable; a relative directory is made absolute
        base_name = recorded if recorded == "smollm2" else str(base_dir)
        export_speculators(head, out, verifier=ns.verifier or str(base_dir), base=base_name, k=ns.k, dtype=dtype)
    except ValueError as exc:
        raise ConfigError(f"pyramid distill export {ns.head}: {exc}") from None
    print(f"wrote {out} (speculators eagle3, k={ns.k}); vLLM: speculative_config="
          f'{{"method": "eagle3", "model": "{out}", "num_speculative_tokens": {ns.k}}}; '
          f"pyramid: --stage feature:path={out}")
    return 0
