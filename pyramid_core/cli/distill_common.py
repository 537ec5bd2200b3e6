"""What the ``pyramid distill`` subcommands share: their common options, where they write (checked
before they start), the target they distil from, and the command line they record."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from pyramid_core.cli.argtypes import seed_below
from pyramid_core.errors import ConfigError

__all__ = ["common_args", "home", "check_outputs", "command_line", "load_target", "usable_device", "corpus_dir",
           "corpus_manifest", "record_corpus"]

# distillation derives per-epoch and per-try seeds as seed * 1_000_003 + i, which must stay below
# 2**64 (what torch.manual_seed takes)
DISTILL_SEED = seed_below(2**44)


def common_args(p: argparse.ArgumentParser) -> None:
    """``--workdir``, ``--corpus``, ``--seed``, ``--smoke``, ``--device`` (``-q`` / ``--quiet``, no progress bars, is every command's)."""
    p.add_argument("--workdir", metavar="DIR", help="folder for corpus, checkpoints and stages (default $PYRAMID_HOME/distill)")
    p.add_argument("--corpus", metavar="DIR", help="corpus folder (default WORKDIR/corpus)")
    p.add_argument("--seed", type=DISTILL_SEED, default=0, help="an integer in [0, 2**44)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run of every step, evaluation included (well under a minute on a CPU; what CI runs)")
    p.add_argument("--device", help="where the target and the students run (cpu, cuda, ...; default cpu)")


def home(ns: argparse.Namespace) -> Path:
    """Where corpus, checkpoints and trained stages go: --workdir, default $PYRAMID_HOME/distill."""
    # lazy: the hf backend loads with its plugin
    from pyramid_core.backends.hf.smollm2 import model_home

    return Path(ns.workdir).expanduser() if getattr(ns, "workdir", None) else model_home() / "distill"


def corpus_dir(ns: argparse.Namespace) -> Path:
    """The corpus folder: --corpus, default WORKDIR/corpus."""
    return Path(ns.corpus or home(ns) / "corpus")


def check_outputs(ns: argparse.Namespace, *, corpus: bool = False, out: str = "") -> None:
    """Check every place the command writes before it starts: the workdir, the corpus folder
    when the command builds it, ``--out`` as a folder (``out="dir"``) or a file (``"file"``),
    and ``--ship``."""
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.outputs import output_dir, output_file

    if getattr(ns, "workdir", None) or out != "file":  # eval reads the workdir only with --corpus-sample
        output_dir(home(ns), "--workdir")
    if corpus:
        output_dir(Path(ns.corpus) if ns.corpus else home(ns) / "corpus", "--corpus")
    if out == "dir" and getattr(ns, "out", None):
        output_dir(ns.out, "--out")
    if out == "file" and getattr(ns, "out", None):
        output_file(ns.out, "--out")
    if getattr(ns, "ship", None):
        output_dir(ns.ship, "--ship")


def command_line(ns: argparse.Namespace) -> str:
    """The command as it was given (``pyramid_core.cli.main`` keeps its argv on ``ns.argv``)."""
    argv = getattr(ns, "argv", None)
    return "pyramid " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def load_target(ns: argparse.Namespace) -> tuple[Any, Any]:
    """The target's model (on ``--device``) and tokenizer; refused before ``pyramid setup``."""
    # lazy: the hf backend loads with its plugin
    from pyramid_core.backends.hf.loading import load_model, load_tokenizer
    from pyramid_core.backends.hf.smollm2 import smollm2_dir, smollm2_ready

    if not smollm2_ready():
        raise ConfigError("distillation needs the target: run `pyramid setup` first")
    return load_model(smollm2_dir(), device=usable_device(ns)), load_tokenizer(smollm2_dir())


def usable_device(ns: argparse.Namespace) -> str:
    """``--device`` (default cpu), refused with torch's reason when it is not usable here."""
    name = getattr(ns, "device", None) or "cpu"
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as exc:
        raise ConfigError(f"--device {name!r} is not usable here: {exc}") from None
    return name


def corpus_manifest(ns: argparse.Namespace) -> dict[str, Any]:
    """The finished corpus's ``corpus.json``; refused when ``pyramid distill corpus`` has not run."""
    path = corpus_dir(ns) / "corpus.json"
    if not path.is_file():
        raise ConfigError(f"no finished corpus at {path.parent}; run `pyramid distill corpus` first")
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def record_corpus(ns: argparse.Namespace, manifest: dict[str, Any]) -> None:
    """Write the finished corpus's ``corpus.json`` with the command that built it (``distill
    corpus`` or ``distill all``), which the stages trained on it record in turn."""
    manifest.setdefault("command", command_line(ns))
    (corpus_dir(ns) / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n")
