"""``pyramid distill feature``: trains a feature-level draft (EAGLE family) on the corpus, with the
target's features computed once (``pyramid_core.lab.distill.heads``); ``--ship`` copies the head
and records its held-out evaluation."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyramid_core.cli.argtypes import int_at_least
from pyramid_core.cli.common import show_progress
from pyramid_core.cli.distill_common import (
    command_line,
    common_args,
    corpus_dir,
    corpus_manifest,
    home,
    load_target,
)
from pyramid_core.cli.distill_eval import eval_args, eval_defaults, eval_markdown, evaluate
from pyramid_core.cli.distill_train import train_args
from pyramid_core.errors import ConfigError

__all__ = ["configure"]

_log = logging.getLogger(__name__)
SORT_WINDOW = 512
"""``--sort-window``'s default: on the 610 k-position corpus of docs/distill.md, 512 raises the real
tokens per padded token of a 4,096-token batch from 0.58 to 0.96 (``train._epoch_batches``)."""


def configure(f: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    common_args(f)
    f.add_argument("--variant", choices=("eagle1", "eagle3"), default="eagle1",
                   help="eagle1: the final-normed feature, regressed (default); eagle3: several layers fused")
    f.add_argument("--layers", help="target layers read (-1 = final-normed; default: eagle1 -1; eagle3 1,14,26, the layers vLLM feeds an EAGLE-3 head of a 30-layer target, so the head exports to vLLM)")
    f.add_argument("--depth", type=int, default=1, help="decoder layers in the head (default 1)")
    f.add_argument("--sub-vocab", type=int, default=8192, help="rows of its own sub-vocabulary head; 0 = the target's head")
    f.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    f.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    f.add_argument("--unroll", type=int, default=2, help="training-time test: passes over its own predictions (default 2)")
    f.add_argument("--ce-weight", type=float, default=0.1, help="eagle1: weight of the token loss (default 0.1)")
    f.add_argument("--max-positions", type=int, default=400_000,
                   help="bound on the corpus positions whose target features are computed and cached (default 400000)")
    f.add_argument("--init", default="random", metavar="{random,target,DIR}",
                   help="how the head starts: random, target (its decoder layer from the target's last one; "
                        "the input map the identity on the deepest feature), or the folder of a trained head of "
                        "the same architecture (a warm start: its weights and sub-vocabulary, a fresh optimiser "
                        "and learning-rate schedule; e.g. a head trained on another corpus, or an imported one)")
    f.add_argument("--sort-window", type=int_at_least(0), default=SORT_WINDOW, metavar="N",
                   help=f"batch sequences of similar lengths: sort each window of N shuffled sequences by length "
                        f"(less padding per step; 0 = batches of the shuffled order; default {SORT_WINDOW})")
    f.add_argument("--features", metavar="DIR",
                   help="cache of the target's features (default OUT/features); heads reading the same layers of "
                        "the same corpus subset can share one")
    f.add_argument("--no-autocast", action="store_true", help="compute features and train in float32 (default bfloat16 autocast)")
    f.add_argument("--partial-corpus", action="store_true",
                   help="train on the shards of a corpus still being built (its hash is then over the shards used)")
    f.add_argument("--add-corpus", metavar="DIR", action="append", default=[],
                   help="also train on this corpus (repeatable; --partial-corpus applies to it too); the recorded "
                        "hash is then over every sequence used")
    f.add_argument("--out", help="output folder (default WORKDIR/feature)")
    f.add_argument("--ship", metavar="DIR", help="also copy the trained head to DIR and write its held-out evaluation "
                                                 "into DIR/stage.json (e.g. the family's feature/ folder)")
    train_args(f)
    eval_args(f)
    return run


def _feature_config(ns: argparse.Namespace) -> Any:
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.distill.heads import FeatureTrainConfig

    text = ns.layers or ("-1" if ns.variant == "eagle1" else "1,14,26")
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--layers must be comma-separated layer numbers, got {text!r}") from None
    if ns.smoke:
        return FeatureTrainConfig(layers=layers, variant=ns.variant, depth=ns.depth, sub_vocab=min(ns.sub_vocab, 512),
                                  steps=3, batch_tokens=256, warmup=1, unroll=ns.unroll, max_positions=2000,
                                  seed=ns.seed, save_every=2, init=ns.init, sort_window=ns.sort_window)
    return FeatureTrainConfig(layers=layers, variant=ns.variant, depth=ns.depth, sub_vocab=ns.sub_vocab, steps=ns.steps,
                              batch_tokens=ns.batch_tokens, lr=ns.lr, unroll=ns.unroll, ce_weight=ns.ce_weight,
                              max_positions=ns.max_positions, seed=ns.seed, init=ns.init,
                              sort_window=ns.sort_window)


def _load(folder: Path, ns: argparse.Namespace, *, first: bool = False) -> tuple[list[Any], dict[str, Any]]:
    """A corpus's sequences and its manifest: ``corpus.json`` once it is finished, else (with
    --partial-corpus) a record of the shards written so far and the recipe they follow."""
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.distill.corpus import CORPUS_MANIFEST, corpus_hash, load_corpus

    manifest: dict[str, Any]
    if (folder / CORPUS_MANIFEST).is_file() or not ns.partial_corpus:
        if first:
            manifest = corpus_manifest(ns)
        elif (folder / CORPUS_MANIFEST).is_file():
            manifest = json.loads((folder / CORPUS_MANIFEST).read_text())
        else:
            raise ConfigError(f"--add-corpus {folder}: no finished corpus there ({CORPUS_MANIFEST} missing); "
                              "finish it with `pyramid distill corpus`, or pass --partial-corpus")
        sequences = load_corpus(folder)
    else:
        sequences = load_corpus(folder, require_manifest=False)
        manifest = {"sha256": corpus_hash(sequences), "partial_shards": len(list(folder.glob("shard-*.pt"))),
                    "target_positions": sum(s.n_targets for s in sequences)}
        if (folder / "harvest.json").is_file():  # the recipe, which a partial corpus has no corpus.json to record
            manifest["recipe"] = json.loads((folder / "harvest.json").read_text())
    if not sequences:
        raise ConfigError(f"no corpus sequences in {folder}; run `pyramid distill corpus` first")
    return sequences, manifest


def run(ns: argparse.Namespace) -> int:
    """Train (or resume) a feature head on the corpus; with --ship, copy it and evaluate it."""
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.distill.corpus import corpus_hash
    from pyramid_core.lab.distill.heads import train_feature_head
    from pyramid_core.lab.outputs import json_text

    model, tokenizer = load_target(ns)
    sequences, manifest = _load(corpus_dir(ns), ns, first=True)
    if ns.add_corpus:
        parts = [manifest]
        for folder in ns.add_corpus:
            more, part = _load(Path(folder), ns)
            sequences += more
            parts.append(part | {"path": str(folder)})
        manifest = {"sha256": corpus_hash(sequences), "target_positions": sum(s.n_targets for s in sequences),
                    "command": " ; ".join(str(m.get("command")) for m in parts), "parts": parts}
    cfg = _feature_config(ns)
    out = Path(ns.out or home(ns) / ("smoke-feature" if ns.smoke else "feature"))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    metadata = {"role": "feature", "command": command_line(ns), "seed": cfg.seed,
                "corpus_sha256": manifest.get("sha256"), "corpus_positions": manifest.get("target_positions"),
                "corpus_partial_shards": manifest.get("partial_shards"), "corpus_command": manifest.get("command"),
                "corpus_parts": manifest.get("parts")}
    report = train_feature_head(model, sequences, cfg, out, base="smollm2", metadata=metadata, eos=eos,
                                max_minutes=ns.max_minutes, autocast=not ns.no_autocast,
                                corpus_sha256=manifest.get("sha256"), features_dir=ns.features,
                                progress=show_progress(ns))
    print(json_text(report, indent=2))
    if not report["finished"]:
        _log.warning("stopped after %s steps (--max-minutes); run the same command to resume", report["steps"])
        return 0
    if ns.ship:
        from pyramid_core.backends.hf.student import weights_record

        ship = Path(ns.ship)
        ship.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "stage.json"):
            shutil.copy2(out / name, ship / name)
        ns.stage = [f"hf:path={ship}", "smollm2"]
        eval_defaults(ns)
        evaluation = evaluate(ns.stage, ns)
        info = json.loads((ship / "stage.json").read_text())
        info["training"] = report
        info["evaluation"] = evaluation
        info["weights"] = weights_record(ship / "model.safetensors")  # what loading and `pyramid setup` check
        (ship / "stage.json").write_text(json.dumps(info, indent=2) + "\n")
        print(eval_markdown(evaluation))
        print(f"feature head written to {ship}")
    return 0
