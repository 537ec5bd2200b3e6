"""``pyramid distill corpus``: the target answers training prompts and reads Python sources; its
top-k next-token distributions are stored (resumable)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from pyramid_core.cli.common import show_progress
from pyramid_core.cli.distill_common import (
    check_outputs,
    command_line,
    common_args,
    corpus_dir,
    load_target,
)

__all__ = ["configure", "corpus_args", "corpus_config"]


def corpus_args(p: argparse.ArgumentParser, new_tokens_option: str) -> None:
    """The corpus's size options; ``new_tokens_option`` names the tokens-per-answer flag."""
    p.add_argument("--prompts", type=int, default=720, help="templated training prompts (each answered greedily and sampled)")
    p.add_argument("--self-instruct", type=int, default=0, metavar="N",
                   help="also N prompts the target writes itself (answered the same way; default 0)")
    p.add_argument(new_tokens_option, type=int, default=128, help="tokens per answer")
    p.add_argument("--python-chars", type=int, default=200_000, help="characters of Python's stdlib sources")
    p.add_argument("--batch-size", type=int, default=48, help="sequences per target batch")


def corpus_config(ns: argparse.Namespace) -> Any:
    """The ``CorpusConfig`` of the parsed options (tiny with ``--smoke``)."""
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.distill.corpus import CorpusConfig

    if ns.smoke:
        return CorpusConfig(prompts=4, new_tokens=8, python_chars=3000, window=64, batch_size=4, seed=ns.seed,
                            self_instruct=2 if ns.self_instruct else 0, self_instruct_tokens=24)
    new_tokens = getattr(ns, "new_tokens_corpus", None) or ns.new_tokens
    return CorpusConfig(prompts=ns.prompts, new_tokens=new_tokens, python_chars=ns.python_chars,
                        batch_size=ns.batch_size, seed=ns.seed, self_instruct=ns.self_instruct)


def configure(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    common_args(p)
    corpus_args(p, "--new-tokens")
    return run


def run(ns: argparse.Namespace) -> int:
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.distill.corpus import build_corpus
    from pyramid_core.lab.prompts import load_prompts

    check_outputs(ns, corpus=True)
    model, tokenizer = load_target(ns)
    held_out = [p.text for p in load_prompts()]
    out = corpus_dir(ns)
    manifest = build_corpus(model, tokenizer, out, corpus_config(ns), held_out=held_out, progress=show_progress(ns))
    manifest.setdefault("command", command_line(ns))
    (out / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))
    return 0
