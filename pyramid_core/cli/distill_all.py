"""``pyramid distill all``: the whole recipe -- corpus, draft, qualifier, held-out evaluation --
then the family folder with its metadata (``family.json``)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from pyramid_core.cli.common import show_progress
from pyramid_core.cli.distill_common import (
    check_outputs,
    command_line,
    common_args,
    corpus_dir,
    home,
    load_target,
    record_corpus,
)
from pyramid_core.cli.distill_corpus import corpus_args, corpus_config
from pyramid_core.cli.distill_eval import (
    EVAL_ALL_CORPUS_SAMPLE,
    eval_args,
    eval_defaults,
    eval_markdown,
    evaluate,
)
from pyramid_core.cli.distill_train import ROLES, train_args, train_role

__all__ = ["configure"]


def configure(a: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    common_args(a)
    corpus_args(a, "--new-tokens-corpus")
    a.add_argument("--draft-steps", type=int, help=f"draft optimiser steps (default {ROLES['draft']['steps']})")
    a.add_argument("--qualifier-steps", type=int, help=f"qualifier optimiser steps (default {ROLES['qualifier']['steps']})")
    a.add_argument("--ship", metavar="DIR", help="family folder to write (default WORKDIR/family)")
    train_args(a)
    eval_args(a, smoke="150, 4 with --smoke")
    return run


def run(ns: argparse.Namespace) -> int:
    """corpus -> draft -> qualifier -> held-out evaluation -> family folder with metadata."""
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.distill.corpus import build_corpus
    from pyramid_core.lab.prompts import load_prompts

    check_outputs(ns, corpus=True)
    eval_defaults(ns, EVAL_ALL_CORPUS_SAMPLE)
    model, tokenizer = load_target(ns)
    manifest = build_corpus(model, tokenizer, corpus_dir(ns), corpus_config(ns),
                            held_out=[p.text for p in load_prompts()], progress=show_progress(ns))
    record_corpus(ns, manifest)
    reports = {}
    for role in ("draft", "qualifier"):
        ns.layers = ns.sub_vocab = ns.lr = None
        ns.steps = getattr(ns, f"{role}_steps")
        ns.out = str(home(ns) / role) if not ns.smoke else str(home(ns) / f"smoke-{role}")
        reports[role] = train_role(ns, role, manifest)
        if not reports[role]["finished"]:
            print(f"{role}: time budget ran out; run the same command to resume", file=sys.stderr)
            return 4
    from pyramid_core.backends.hf.student import weights_record

    ship = Path(ns.ship or home(ns) / ("smoke-family" if ns.smoke else "family"))
    ship.mkdir(parents=True, exist_ok=True)
    for role in ("draft", "qualifier"):
        dest = ship / role
        dest.mkdir(exist_ok=True)
        for f in ("model.safetensors", "stage.json"):
            shutil.copy2(home(ns) / (f"smoke-{role}" if ns.smoke else role) / f, dest / f)
        info = json.loads((dest / "stage.json").read_text())  # what loading and `pyramid setup` check
        (dest / "stage.json").write_text(json.dumps(info | {"weights": weights_record(dest / "model.safetensors")},
                                                    indent=2) + "\n")
    ns.stage = [f"hf:path={ship / 'draft'}", f"hf:path={ship / 'qualifier'}", "smollm2"]
    evaluation = evaluate(ns.stage, ns)
    family = {
        "family": "SmolLM2-135M-Instruct distilled draft and qualifier",
        "command": command_line(ns),
        "seed": ns.seed,
        "corpus": {k: manifest.get(k) for k in ("sha256", "sequences", "target_positions", "by_source", "prompts", "config", "command")},
        "training": reports,
        "evaluation": evaluation,
    }
    (ship / "family.json").write_text(json.dumps(family, indent=2) + "\n")
    print(eval_markdown(evaluation))
    print(f"family written to {ship}")
    return 0
