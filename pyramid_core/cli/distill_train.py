"""``pyramid distill train``: trains one student stage (draft or qualifier) on the corpus, with
resumable checkpoints."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyramid_core.cli.common import show_progress
from pyramid_core.cli.distill_common import (
    check_outputs,
    command_line,
    common_args,
    corpus_dir,
    corpus_manifest,
    home,
    load_target,
)
from pyramid_core.errors import ConfigError

__all__ = ["ROLES", "configure", "train_args", "train_role"]

ROLES: dict[str, dict[str, Any]] = {
    # layers of the target each student starts from, its head, and its learning rate
    "draft": {"layers": "0,1", "sub_vocab": 8192, "lr": 1e-3, "steps": 800, "greedy_repeats": 2},
    "qualifier": {"layers": "0,1,2,3,26,27,28,29", "sub_vocab": 0, "lr": 1e-3, "steps": 300, "greedy_repeats": 2},
}

_log = logging.getLogger(__name__)


def train_args(t: argparse.ArgumentParser) -> None:
    """``--batch-tokens`` and ``--max-minutes``, shared by every command that trains."""
    t.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per step")
    t.add_argument("--max-minutes", type=float, help="stop (resumably) after this much training time")


def configure(t: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    common_args(t)
    t.add_argument("--role", choices=sorted(ROLES), required=True)
    t.add_argument("--layers", help="target layers the student starts from (default: draft 0,1; qualifier 0-3,26-29)")
    t.add_argument("--sub-vocab", type=int, help="rows of a sub-vocabulary head, 0 = the full tied head "
                                                   "(default: draft 8192, qualifier 0)")
    t.add_argument("--out", help="output folder (default WORKDIR/ROLE)")
    t.add_argument("--steps", type=int, help="optimiser steps (default: draft 800, qualifier 300)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    train_args(t)
    return run


def _train_config(ns: argparse.Namespace) -> Any:
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.distill.train import TrainConfig

    role = ROLES[ns.role]
    layers_text = ns.layers or role["layers"]
    try:
        layers = tuple(int(x) for x in layers_text.split(","))
    except ValueError:
        raise ConfigError(f"--layers must be comma-separated layer indices, got {layers_text!r}") from None
    sub_vocab = role["sub_vocab"] if ns.sub_vocab is None else ns.sub_vocab
    if ns.smoke:
        return TrainConfig(layers=layers, sub_vocab=min(sub_vocab, 512), steps=3, batch_tokens=256, lr=role["lr"],
                           warmup=1, seed=ns.seed, save_every=2)
    return TrainConfig(layers=layers, sub_vocab=sub_vocab, steps=ns.steps or role["steps"], batch_tokens=ns.batch_tokens,
                       lr=ns.lr or role["lr"], seed=ns.seed, greedy_repeats=role["greedy_repeats"])


def train_role(ns: argparse.Namespace, role: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume) the student of ``role`` on the corpus of ``manifest``; its report."""
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.distill.corpus import load_corpus
    from pyramid_core.lab.distill.train import train_student

    model, tokenizer = load_target(ns)
    ns.role = role
    cfg = _train_config(ns)
    sequences = load_corpus(corpus_dir(ns))
    out = Path(getattr(ns, "out", None) or home(ns) / role)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    metadata = {"role": role, "command": command_line(ns), "seed": cfg.seed,
                "corpus_sha256": manifest.get("sha256"), "corpus_positions": manifest.get("target_positions")}
    return train_student(model, sequences, cfg, out, base="smollm2", metadata=metadata, eos=eos,
                         max_minutes=ns.max_minutes, progress=show_progress(ns))


def run(ns: argparse.Namespace) -> int:
    from pyramid_core.lab.outputs import json_text  # lazy: lab is kept out of CLI start-up

    check_outputs(ns, out="dir")
    report = train_role(ns, ns.role, corpus_manifest(ns))
    print(json_text(report, indent=2))
    if not report["finished"]:
        _log.warning("stopped after %s steps (--max-minutes); run the same command to resume", report["steps"])
    return 0
