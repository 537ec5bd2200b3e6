"""``pyramid distill eval``: greedy top-1 agreement of each stage on the held-out prompt set, and
cost ratios; also the evaluation that ``distill all`` and ``distill feature --ship`` record."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from pyramid_core.build import check_same_tokenizer, default_chain, make_stage
from pyramid_core.cli.argtypes import int_at_least
from pyramid_core.cli.common import show_progress
from pyramid_core.cli.distill_common import check_outputs, command_line, corpus_dir, usable_device
from pyramid_core.errors import ConfigError

__all__ = ["configure", "eval_args", "eval_defaults", "evaluate", "eval_markdown", "EVAL_ALL_CORPUS_SAMPLE"]

# the held-out evaluation: (full run, --smoke) defaults of --per-kind, --new-tokens, --corpus-sample;
# --smoke also keeps only the first SMOKE_EVAL_PROMPTS prompts and times each stage SMOKE_TIMING times
EVAL_DEFAULTS = {"per_kind": (10, 1), "new_tokens": (64, 8)}
EVAL_ALL_CORPUS_SAMPLE = (150, 4)
SMOKE_EVAL_PROMPTS = 2
TIMING_REPEATS = (30, 5)


def eval_args(e: argparse.ArgumentParser, smoke: str = "") -> None:
    """``--per-kind``, ``--new-tokens``, ``--corpus-sample``; ``smoke`` describes the
    ``--corpus-sample`` default of the command (and that ``--smoke`` shrinks them)."""
    e.add_argument("--per-kind", type=int_at_least(1), default=None,
                   help=f"held-out prompts per task kind (default all 10{smoke and '; --smoke: 1, and 2 prompts in all'})")
    e.add_argument("--new-tokens", type=int_at_least(1), default=None,
                   help=f"target greedy tokens per prompt (default 64{smoke and ', 8 with --smoke'})")
    e.add_argument("--corpus-sample", type=int_at_least(0), default=None, metavar="N",
                   help="also measure agreement on N training sequences (memorisation vs generalisation; "
                        f"default {smoke or '0'})")


def eval_defaults(ns: argparse.Namespace, corpus_sample: tuple[int, int] = (0, 0)) -> None:
    """Fill the evaluation options not given: full-size, or tiny with ``--smoke``."""
    smoke = int(bool(getattr(ns, "smoke", False)))
    for name, values in {**EVAL_DEFAULTS, "corpus_sample": corpus_sample}.items():
        if getattr(ns, name, None) is None:
            setattr(ns, name, values[smoke])


def configure(e: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    e.add_argument("--workdir", metavar="DIR", help="folder holding corpus/ (for --corpus-sample)")
    e.add_argument("--corpus", metavar="DIR", help="corpus folder (default WORKDIR/corpus)")
    e.add_argument("--stage", action="append", metavar="STAGE",
                   help="stages smallest first, the target last (default: the shipped draft, qualifier, smollm2)")
    eval_args(e)
    e.add_argument("--json", action="store_true")
    e.add_argument("--out", metavar="FILE.json")
    e.add_argument("--device", help="where the stages run (cpu, cuda, ...; default cpu)")
    return run


def evaluate(specs: list[str], ns: argparse.Namespace) -> dict[str, Any]:
    """The held-out evaluation of the stages ``specs`` (smallest first, the target last)."""
    # lazy: the hf backend loads with its plugin; lab/ stays out of CLI start-up
    from pyramid_core.backends.hf.head_stage import FeatureStage
    from pyramid_core.backends.hf.stage import HFStage
    from pyramid_core.lab.distill.evaluate import evaluate_stages
    from pyramid_core.lab.prompts import encode_prompt, load_prompts

    where = usable_device(ns)
    stages = [make_stage(s, device=where, dtype="float32") for s in specs]  # the figures in docs/distill.md
    models: list[Any] = []
    for spec, stage in zip(specs, stages, strict=True):
        if not isinstance(stage, HFStage | FeatureStage):
            raise ConfigError(f"stage {spec!r} is not a Hugging Face model backend; `pyramid distill eval` compares models")
        models.append(stage)
    check_same_tokenizer(models)
    tokenizer = models[-1].tokenizer
    smoke = bool(getattr(ns, "smoke", False))
    prompts = load_prompts(per_kind=ns.per_kind)[: SMOKE_EVAL_PROMPTS if smoke else None]
    encoded = [(p.kind, encode_prompt(tokenizer, p.text, True)) for p in prompts]
    reports = evaluate_stages(models, encoded, ns.new_tokens, timing_repeats=TIMING_REPEATS[smoke],
                              progress=show_progress(ns))
    result: dict[str, Any] = {
        "command": command_line(ns), "stages": specs, "prompts": len(prompts), "new_tokens": ns.new_tokens,
        "held_out": "pyramid_core/data/prompts.jsonl (never trained on)",
        "results": [attrs.asdict(r) for r in reports]}
    if getattr(ns, "corpus_sample", 0):
        # lazy: lab/ stays out of CLI start-up
        from pyramid_core.lab.distill.corpus import load_corpus
        from pyramid_core.lab.distill.evaluate import corpus_agreement, feature_source

        sequences = load_corpus(corpus_dir(ns))
        result["corpus_sample"] = ns.corpus_sample
        for i, r in enumerate(result["results"][:-1]):
            r["corpus_agreement"] = corpus_agreement(stages[i], sequences, ns.corpus_sample,
                                                     source=feature_source(stages, i))
    return result


def eval_markdown(result: dict[str, Any]) -> str:
    """The tables of an ``evaluate`` result, in Markdown."""
    from pyramid_core.lab.outputs import md_escape  # lazy: lab is kept out of CLI start-up

    lines = ["| stage | agreement with target | agreement with next stage | ms/forward | c (vs next) | c (vs target) "
             "| agreement on training text (greedy / sampled / python) |",
             "|---|---|---|---|---|---|---|"]
    for spec, r in zip(result["stages"], result["results"], strict=True):
        nxt = "–" if r["agreement_with_next"] is None else f"{r['agreement_with_next']:.3f}"
        cn = "–" if r["cost_vs_next"] is None else f"{r['cost_vs_next']:.3f}"
        seen = r.get("corpus_agreement")
        seen_text = " / ".join(f"{seen.get(k, float('nan')):.3f}" for k in ("greedy", "sampled", "python")) if seen else "–"
        lines.append(f"| {md_escape(spec)} | {r['agreement_with_target']:.3f} | {nxt} | {r['ms_per_forward']:.1f} | {cn} "
                     f"| {r['cost_vs_target']:.3f} | {seen_text} |")
    kinds = sorted({k for r in result["results"] for k in r["by_kind"]})
    lines += ["", "| stage | " + " | ".join(md_escape(k) for k in kinds) + " |", "|---|" + "---|" * len(kinds)]
    lines += [f"| {md_escape(spec)} | " + " | ".join(f"{r['by_kind'].get(k, float('nan')):.3f}" for k in kinds) + " |"
              for spec, r in zip(result["stages"], result["results"], strict=True)]
    for spec, r in zip(result["stages"], result["results"], strict=True):
        if r.get("by_depth"):
            depths = ", ".join(f"{d + 1}: {a:.3f}" for d, a in enumerate(r["by_depth"]))
            lines.append(f"\n{md_escape(spec)}: agreement with the target by draft depth ({depths})")
    confidence = [r.get("by_confidence") for r in result["results"]]
    if confidence and all(confidence):
        from pyramid_core.lab.distill.evaluate import CONFIDENCE_BINS

        edges = CONFIDENCE_BINS
        bins = [f"[{edges[i]}, {edges[i + 1]}{']' if i + 2 == len(edges) else ')'}" for i in range(len(edges) - 1)]
        lines += ["", "Agreement by the target's probability of its own token (the target's row: the share of positions "
                  "in each bin)", "", "| stage | " + " | ".join(bins) + " |", "|---|" + "---|" * len(bins)]
        lines += [f"| {md_escape(spec)} | " + " | ".join(f"{v:.3f}" for v in r["by_confidence"]) + " |"
                  for spec, r in zip(result["stages"], result["results"], strict=True)]
    return "\n".join(lines) + "\n"


def run(ns: argparse.Namespace) -> int:
    from pyramid_core.lab.outputs import json_text  # lazy: lab is kept out of CLI start-up

    check_outputs(ns, out="file")
    eval_defaults(ns)
    specs = list(ns.stage) if ns.stage else list(default_chain(purpose="no --stage was given").stages)
    result = evaluate(specs, ns)
    if ns.json:
        print(json_text(result, indent=2))
    else:
        print(eval_markdown(result))
    if ns.out:
        Path(ns.out).write_text(json_text(result, indent=2) + "\n")
    return 0
