"""``pyramid distill``: build a draft and a qualifier for SmolLM2-135M by knowledge distillation.

    pyramid distill corpus      the target answers training prompts and reads Python sources;
                                its top-k next-token distributions are stored (resumable)
    pyramid distill train       trains one student stage on the corpus (resumable checkpoints)
    pyramid distill eval        greedy top-1 agreement on the held-out prompt set, and cost ratios
    pyramid distill all         the whole recipe, then writes the family's metadata
    pyramid distill feature     trains a feature-level draft (EAGLE family) on the corpus, with
                                the target's features computed once (``lab.distill.heads``)
    pyramid distill export      a trained EAGLE-3 head as a speculators checkpoint (vLLM serves it)

Everything defaults to ``$PYRAMID_HOME/distill``; ``--smoke`` shrinks every step, the held-out
evaluation included, to a run of well under a minute on a CPU (what CI runs). Every folder or file
a step writes is checked before the step starts (``pyramid_core.lab.outputs``); the corpus and the
training resume where an interrupted run stopped. Each subcommand is a ``configure``/``run`` pair
of its own module, ``pyramid_core.cli.distill_SUBCOMMAND``; what they share is in ``distill_common``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pyramid_core.cli import (
    distill_all,
    distill_corpus,
    distill_eval,
    distill_export,
    distill_feature,
    distill_train,
)

__all__ = ["configure", "SUBCOMMANDS"]

Configure = Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]

SUBCOMMANDS: tuple[tuple[str, Configure, str], ...] = (
    ("corpus", distill_corpus.configure, "the target answers training prompts and reads Python sources"),
    ("train", distill_train.configure, "train one student stage on the corpus (resumable)"),
    ("eval", distill_eval.configure, "greedy top-1 agreement on held-out prompts, and cost ratios c"),
    ("all", distill_all.configure, "the whole recipe: corpus, draft, qualifier, evaluation, family folder"),
    ("feature", distill_feature.configure,
     "train a feature-level draft (EAGLE family) that reads the target's hidden states"),
    ("export", distill_export.configure, "write a trained EAGLE-3 head as a speculators checkpoint (vLLM's format)"),
)


def configure(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """The ``pyramid distill`` parser (its subcommands corpus | train | eval | all | feature | export)."""
    dsub = p.add_subparsers(dest="distill_command", required=True)
    for name, configure_command, description in SUBCOMMANDS:
        sub = dsub.add_parser(name, help=description)
        sub.set_defaults(distill_run=configure_command(sub))
    return run


def run(ns: argparse.Namespace) -> int:
    command: Callable[[argparse.Namespace], int] = ns.distill_run
    return command(ns)
