"""``pyramid distill``: build a draft and a qualifier for SmolLM2-135M by knowledge distillation.

    pyramid distill corpus      the target answers training prompts and reads Python sources;
                                its top-k next-token distributions are stored (resumable)
    pyramid distill train       trains one student stage on the corpus (resumable checkpoints)
    pyramid distill eval        greedy top-1 agreement on the held-out prompt set, and cost ratios
    pyramid distill all         the whole recipe, then writes the family's metadata
    pyramid distill feature     trains a feature-level draft (EAGLE family) on the corpus, with
                                the target's features computed once (``distill.feature``)

Everything defaults to ``$PYRAMID_HOME/distill``; ``--smoke`` shrinks every step, the held-out
evaluation included, to a run of well under a minute on a CPU (what CI runs). Every folder or file
a step writes is checked before the step starts (``pyramid_core.lab.outputs``); the corpus and the
training resume where an interrupted run stopped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from pyramid_core.cli.argtypes import int_at_least

__all__ = ["configure"]


def _home(ns: argparse.Namespace) -> Path:
    """Where corpus, checkpoints and trained stages go: --workdir, default $PYRAMID_HOME/distill."""
    from pyramid_core.backends.hf.smollm2 import model_home

    return Path(ns.workdir).expanduser() if getattr(ns, "workdir", None) else model_home() / "distill"


def _outputs(ns: argparse.Namespace, *, corpus: bool = False, out: str = "") -> None:
    """Check every place the command writes before it starts: the workdir, the corpus folder
    when the command builds it, ``--out`` as a folder (``out="dir"``) or a file (``"file"``),
    and ``--ship``."""
    from pyramid_core.lab.outputs import output_dir, output_file

    if getattr(ns, "workdir", None) or out != "file":  # eval reads the workdir only with --corpus-sample
        output_dir(_home(ns), "--workdir")
    if corpus:
        output_dir(Path(ns.corpus) if ns.corpus else _home(ns) / "corpus", "--corpus")
    if out == "dir" and getattr(ns, "out", None):
        output_dir(ns.out, "--out")
    if out == "file" and getattr(ns, "out", None):
        output_file(ns.out, "--out")
    if getattr(ns, "ship", None):
        output_dir(ns.ship, "--ship")


def _command_line(ns: argparse.Namespace) -> str:
    """The command as it was given (``pyramid_core.cli.main`` keeps its argv on ``ns.argv``)."""
    argv = getattr(ns, "argv", None)
    return "pyramid " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def _target(ns: argparse.Namespace) -> tuple[Any, Any]:
    from pyramid_core.backends.hf.loading import load_model, load_tokenizer
    from pyramid_core.backends.hf.smollm2 import smollm2_dir, smollm2_ready
    from pyramid_core.errors import ConfigError

    if not smollm2_ready():
        raise ConfigError("distillation needs the target: run `pyramid setup` first")
    return load_model(smollm2_dir(), device=_device(ns)), load_tokenizer(smollm2_dir())


def _device(ns: argparse.Namespace) -> str:
    import torch

    from pyramid_core.errors import ConfigError

    device = getattr(ns, "device", None) or "cpu"
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ConfigError(f"--device {device!r} is not usable here: {exc}") from None
    return device


def _corpus_config(ns: argparse.Namespace) -> Any:
    from pyramid_core.lab.distill.corpus import CorpusConfig

    if ns.smoke:
        return CorpusConfig(prompts=4, new_tokens=8, python_chars=3000, window=64, batch_size=4, seed=ns.seed,
                            self_instruct=2 if ns.self_instruct else 0, self_instruct_tokens=24)
    new_tokens = getattr(ns, "new_tokens_corpus", None) or ns.new_tokens
    return CorpusConfig(prompts=ns.prompts, new_tokens=new_tokens, python_chars=ns.python_chars,
                        batch_size=ns.batch_size, seed=ns.seed, self_instruct=ns.self_instruct)


def cmd_corpus(ns: argparse.Namespace) -> int:
    from pyramid_core.lab.distill.corpus import build_corpus
    from pyramid_core.lab.prompts import load_prompts

    _outputs(ns, corpus=True)
    model, tokenizer = _target(ns)
    held_out = [p.text for p in load_prompts()]
    out = Path(ns.corpus or _home(ns) / "corpus")
    manifest = build_corpus(model, tokenizer, out, _corpus_config(ns), held_out=held_out, progress=not ns.quiet)
    manifest.setdefault("command", _command_line(ns))
    (out / "corpus.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", metavar="DIR", help="folder for corpus, checkpoints and stages (default $PYRAMID_HOME/distill)")
    p.add_argument("--corpus", metavar="DIR", help="corpus folder (default WORKDIR/corpus)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="a tiny run of every step, evaluation included (well under a minute on a CPU; what CI runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--device", help="where the target and the students run (cpu, cuda, ...; default cpu)")


def _corpus_args(p: argparse.ArgumentParser, new_tokens_option: str) -> None:
    p.add_argument("--prompts", type=int, default=720, help="templated training prompts (each answered greedily and sampled)")
    p.add_argument("--self-instruct", type=int, default=0, metavar="N",
                   help="also N prompts the target writes itself (answered the same way; default 0)")
    p.add_argument(new_tokens_option, type=int, default=128, help="tokens per answer")
    p.add_argument("--python-chars", type=int, default=200_000, help="characters of Python's stdlib sources")
    p.add_argument("--batch-size", type=int, default=48, help="sequences per target batch")


def configure(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """The ``pyramid distill`` parser (its subcommands corpus | train | eval | all)."""
    dsub = p.add_subparsers(dest="distill_command", required=True)

    c = dsub.add_parser("corpus", help="the target answers training prompts and reads Python sources")
    _common(c)
    _corpus_args(c, "--new-tokens")
    c.set_defaults(distill_run=cmd_corpus)

    def train_args(t: argparse.ArgumentParser) -> None:
        t.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per step")
        t.add_argument("--max-minutes", type=float, help="stop (resumably) after this much training time")

    t = dsub.add_parser("train", help="train one student stage on the corpus (resumable)")
    _common(t)
    t.add_argument("--role", choices=sorted(ROLES), required=True)
    t.add_argument("--layers", help="target layers the student starts from (default: draft 0,1; qualifier 0-3,26-29)")
    t.add_argument("--sub-vocab", type=int, help="rows of a sub-vocabulary head, 0 = the full tied head "
                                                   "(default: draft 8192, qualifier 0)")
    t.add_argument("--out", help="output folder (default WORKDIR/ROLE)")
    t.add_argument("--steps", type=int, help="optimiser steps (default: draft 800, qualifier 300)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    train_args(t)
    t.set_defaults(distill_run=cmd_train)

    def eval_args(e: argparse.ArgumentParser, smoke: str = "") -> None:
        e.add_argument("--per-kind", type=int_at_least(1), default=None,
                       help=f"held-out prompts per task kind (default all 10{smoke and '; --smoke: 1, and 2 prompts in all'})")
        e.add_argument("--new-tokens", type=int_at_least(1), default=None,
                       help=f"target greedy tokens per prompt (default 64{smoke and ', 8 with --smoke'})")
        e.add_argument("--corpus-sample", type=int_at_least(0), default=None, metavar="N",
                       help="also measure agreement on N training sequences (memorisation vs generalisation; "
                            f"default {smoke or '0'})")

    e = dsub.add_parser("eval", help="greedy top-1 agreement on held-out prompts, and cost ratios c")
    e.add_argument("--workdir", metavar="DIR", help="folder holding corpus/ (for --corpus-sample)")
    e.add_argument("--corpus", metavar="DIR", help="corpus folder (default WORKDIR/corpus)")
    e.add_argument("--stage", action="append", metavar="SPEC",
                   help="stages smallest first, the target last (default: the shipped draft, qualifier, smollm2)")
    eval_args(e)
    e.add_argument("--json", action="store_true")
    e.add_argument("--out", metavar="FILE.json")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--device", help="where the stages run (cpu, cuda, ...; default cpu)")
    e.set_defaults(distill_run=cmd_eval)

    a = dsub.add_parser("all", help="the whole recipe: corpus, draft, qualifier, evaluation, family folder")
    _common(a)
    _corpus_args(a, "--new-tokens-corpus")
    a.add_argument("--draft-steps", type=int, help=f"draft optimiser steps (default {ROLES['draft']['steps']})")
    a.add_argument("--qualifier-steps", type=int, help=f"qualifier optimiser steps (default {ROLES['qualifier']['steps']})")
    a.add_argument("--ship", metavar="DIR", help="family folder to write (default WORKDIR/family)")
    train_args(a)
    eval_args(a, smoke="150, 4 with --smoke")
    a.set_defaults(distill_run=cmd_all)

    f = dsub.add_parser("feature", help="train a feature-level draft (EAGLE family) that reads the target's hidden states")
    _common(f)
    f.add_argument("--variant", choices=("eagle1", "eagle3"), default="eagle1",
                   help="eagle1: the final-normed feature, regressed (default); eagle3: several layers fused")
    f.add_argument("--layers", help="target layers read (-1 = final-normed; default: eagle1 -1, eagle3 2,14,-1)")
    f.add_argument("--depth", type=int, default=1, help="decoder layers in the head (default 1)")
    f.add_argument("--sub-vocab", type=int, default=8192, help="rows of its own sub-vocabulary head; 0 = the target's head")
    f.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    f.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    f.add_argument("--unroll", type=int, default=2, help="training-time test: passes over its own predictions (default 2)")
    f.add_argument("--ce-weight", type=float, default=0.1, help="eagle1: weight of the token loss (default 0.1)")
    f.add_argument("--max-positions", type=int, default=400_000,
                   help="bound on the corpus positions whose target features are computed and cached (default 400000)")
    f.add_argument("--no-autocast", action="store_true", help="compute features and train in float32 (default bfloat16 autocast)")
    f.add_argument("--partial-corpus", action="store_true",
                   help="train on the shards of a corpus still being built (its hash is then over the shards used)")
    f.add_argument("--out", help="output folder (default WORKDIR/feature)")
    f.add_argument("--ship", metavar="DIR", help="also copy the trained head to DIR and write its held-out evaluation "
                                                 "into DIR/stage.json (e.g. the family's feature/ folder)")
    train_args(f)
    eval_args(f)
    f.set_defaults(distill_run=cmd_feature)
    return run


def run(ns: argparse.Namespace) -> int:
    command: Callable[[argparse.Namespace], int] = ns.distill_run
    return command(ns)


# the held-out evaluation: (full run, --smoke) defaults of --per-kind, --new-tokens, --corpus-sample;
# --smoke also keeps only the first SMOKE_EVAL_PROMPTS prompts and times each stage SMOKE_TIMING times
EVAL_DEFAULTS = {"per_kind": (10, 1), "new_tokens": (64, 8)}
EVAL_ALL_CORPUS_SAMPLE = (150, 4)
SMOKE_EVAL_PROMPTS = 2
TIMING_REPEATS = (30, 5)


def _eval_defaults(ns: argparse.Namespace, corpus_sample: tuple[int, int] = (0, 0)) -> None:
    """Fill the evaluation options not given: full-size, or tiny with ``--smoke``."""
    smoke = int(bool(getattr(ns, "smoke", False)))
    for name, values in {**EVAL_DEFAULTS, "corpus_sample": corpus_sample}.items():
        if getattr(ns, name, None) is None:
            setattr(ns, name, values[smoke])

ROLES: dict[str, dict[str, Any]] = {
    # layers of the target each student starts from, its head, and its learning rate
    "draft": {"layers": "0,1", "sub_vocab": 8192, "lr": 1e-3, "steps": 800, "greedy_repeats": 2},
    "qualifier": {"layers": "0,1,2,3,26,27,28,29", "sub_vocab": 0, "lr": 1e-3, "steps": 300, "greedy_repeats": 2},
}


def _train_config(ns: argparse.Namespace) -> Any:
    from pyramid_core.errors import ConfigError
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


def _train(ns: argparse.Namespace, role: str, corpus_manifest: dict[str, Any]) -> dict[str, Any]:
    from pyramid_core.lab.distill.corpus import load_corpus
    from pyramid_core.lab.distill.train import train_student

    model, tokenizer = _target(ns)
    ns.role = role
    cfg = _train_config(ns)
    corpus_dir = Path(ns.corpus or _home(ns) / "corpus")
    sequences = load_corpus(corpus_dir)
    out = Path(getattr(ns, "out", None) or _home(ns) / role)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    metadata = {"role": role, "command": _command_line(ns), "seed": cfg.seed,
                "corpus_sha256": corpus_manifest.get("sha256"), "corpus_positions": corpus_manifest.get("target_positions")}
    return train_student(model, sequences, cfg, out, base="smollm2", metadata=metadata, eos=eos,
                         max_minutes=ns.max_minutes, progress=not ns.quiet)


def _corpus_manifest(ns: argparse.Namespace) -> dict[str, Any]:
    from pyramid_core.errors import ConfigError

    path = Path(ns.corpus or _home(ns) / "corpus") / "corpus.json"
    if not path.is_file():
        raise ConfigError(f"no finished corpus at {path.parent}; run `pyramid distill corpus` first")
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def cmd_train(ns: argparse.Namespace) -> int:
    _outputs(ns, out="dir")
    report = _train(ns, ns.role, _corpus_manifest(ns))
    print(json.dumps(report, indent=2))
    if not report["finished"]:
        print(f"stopped after {report['steps']} steps (--max-minutes); run the same command to resume", file=sys.stderr)
    return 0


def _eval_specs(ns: argparse.Namespace) -> list[str]:
    from pyramid_core.build import default_chain

    return list(ns.stage) if ns.stage else list(default_chain(purpose="no --stage was given").stages)


def _evaluate(specs: list[str], ns: argparse.Namespace) -> dict[str, Any]:
    from pyramid_core.backends.hf.head_stage import FeatureStage
    from pyramid_core.backends.hf.stage import HFStage
    from pyramid_core.build import check_same_tokenizer, make_stage
    from pyramid_core.errors import ConfigError
    from pyramid_core.lab.distill.evaluate import evaluate_stages
    from pyramid_core.lab.prompts import encode_prompt, load_prompts

    device = _device(ns)
    stages = [make_stage(s, device=device) for s in specs]
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
                              progress=not ns.quiet)
    result: dict[str, Any] = {
        "command": _command_line(ns), "stages": specs, "prompts": len(prompts), "new_tokens": ns.new_tokens,
        "held_out": "pyramid_core/data/prompts.jsonl (never trained on)",
        "results": [attrs.asdict(r) for r in reports]}
    if getattr(ns, "corpus_sample", 0):
        from pyramid_core.lab.distill.corpus import load_corpus
        from pyramid_core.lab.distill.evaluate import corpus_agreement

        sequences = load_corpus(Path(ns.corpus or _home(ns) / "corpus"))
        result["corpus_sample"] = ns.corpus_sample
        for r, stage in zip(result["results"][:-1], stages[:-1], strict=True):
            if isinstance(stage, HFStage):  # a feature draft's agreement needs its source's features
                r["corpus_agreement"] = corpus_agreement(stage, sequences, ns.corpus_sample)
    return result


def _eval_markdown(result: dict[str, Any]) -> str:
    from pyramid_core.lab.outputs import md_escape

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
    return "\n".join(lines) + "\n"


def cmd_eval(ns: argparse.Namespace) -> int:
    _outputs(ns, out="file")
    _eval_defaults(ns)
    result = _evaluate(_eval_specs(ns), ns)
    if ns.json:
        print(json.dumps(result, indent=2))
    else:
        print(_eval_markdown(result))
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def cmd_all(ns: argparse.Namespace) -> int:
    """corpus -> draft -> qualifier -> held-out evaluation -> family folder with metadata."""
    import shutil

    from pyramid_core.lab.distill.corpus import build_corpus
    from pyramid_core.lab.prompts import load_prompts

    _outputs(ns, corpus=True)
    _eval_defaults(ns, EVAL_ALL_CORPUS_SAMPLE)
    model, tokenizer = _target(ns)
    corpus_dir = Path(ns.corpus or _home(ns) / "corpus")
    manifest = build_corpus(model, tokenizer, corpus_dir, _corpus_config(ns),
                            held_out=[p.text for p in load_prompts()], progress=not ns.quiet)
    reports = {}
    for role in ("draft", "qualifier"):
        ns.layers = ns.sub_vocab = ns.lr = None
        ns.steps = getattr(ns, f"{role}_steps")
        ns.out = str(_home(ns) / role) if not ns.smoke else str(_home(ns) / f"smoke-{role}")
        reports[role] = _train(ns, role, manifest)
        if not reports[role]["finished"]:
            print(f"{role}: time budget ran out; run the same command to resume", file=sys.stderr)
            return 4
    ship = Path(ns.ship or _home(ns) / ("smoke-family" if ns.smoke else "family"))
    ship.mkdir(parents=True, exist_ok=True)
    for role in ("draft", "qualifier"):
        dest = ship / role
        dest.mkdir(exist_ok=True)
        for f in ("model.safetensors", "stage.json"):
            shutil.copy2(_home(ns) / (f"smoke-{role}" if ns.smoke else role) / f, dest / f)
    ns.stage = [f"hf:path={ship / 'draft'}", f"hf:path={ship / 'qualifier'}", "smollm2"]
    evaluation = _evaluate(ns.stage, ns)
    family = {
        "family": "SmolLM2-135M-Instruct distilled draft and qualifier",
        "command": _command_line(ns),
        "seed": ns.seed,
        "corpus": {k: manifest.get(k) for k in ("sha256", "sequences", "target_positions", "by_source", "prompts", "config", "command")},
        "training": reports,
        "evaluation": evaluation,
    }
    (ship / "family.json").write_text(json.dumps(family, indent=2) + "\n")
    print(_eval_markdown(evaluation))
    print(f"family written to {ship}")
    return 0


def _feature_config(ns: argparse.Namespace) -> Any:
    from pyramid_core.errors import ConfigError
    from pyramid_core.lab.distill.heads import FeatureTrainConfig

    text = ns.layers or ("-1" if ns.variant == "eagle1" else "2,14,-1")
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--layers must be comma-separated layer numbers, got {text!r}") from None
    if ns.smoke:
        return FeatureTrainConfig(layers=layers, variant=ns.variant, depth=ns.depth, sub_vocab=min(ns.sub_vocab, 512),
                                  steps=3, batch_tokens=256, warmup=1, unroll=ns.unroll, max_positions=2000,
                                  seed=ns.seed, save_every=2)
    return FeatureTrainConfig(layers=layers, variant=ns.variant, depth=ns.depth, sub_vocab=ns.sub_vocab, steps=ns.steps,
                              batch_tokens=ns.batch_tokens, lr=ns.lr, unroll=ns.unroll, ce_weight=ns.ce_weight,
                              max_positions=ns.max_positions, seed=ns.seed)


def cmd_feature(ns: argparse.Namespace) -> int:
    """Train (or resume) a feature head on the corpus; with --ship, copy it and evaluate it."""
    import shutil

    from pyramid_core.errors import ConfigError
    from pyramid_core.lab.distill.corpus import corpus_hash, load_corpus
    from pyramid_core.lab.distill.heads import train_feature_head

    model, tokenizer = _target(ns)
    corpus_dir = Path(ns.corpus or _home(ns) / "corpus")
    if ns.partial_corpus:
        sequences = load_corpus(corpus_dir, require_manifest=False)
        shards = len(list(corpus_dir.glob("shard-*.pt")))
        manifest: dict[str, Any] = {"sha256": corpus_hash(sequences), "partial_shards": shards,
                                    "target_positions": sum(s.n_targets for s in sequences)}
    else:
        manifest = _corpus_manifest(ns)
        sequences = load_corpus(corpus_dir)
    if not sequences:
        raise ConfigError(f"no corpus sequences in {corpus_dir}; run `pyramid distill corpus` first")
    cfg = _feature_config(ns)
    out = Path(ns.out or _home(ns) / ("smoke-feature" if ns.smoke else "feature"))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    metadata = {"role": "feature", "command": _command_line(ns), "seed": cfg.seed,
                "corpus_sha256": manifest.get("sha256"), "corpus_positions": manifest.get("target_positions"),
                "corpus_partial_shards": manifest.get("partial_shards")}
    report = train_feature_head(model, sequences, cfg, out, base="smollm2", metadata=metadata, eos=eos,
                                max_minutes=ns.max_minutes, autocast=not ns.no_autocast,
                                corpus_sha256=manifest.get("sha256"), progress=not ns.quiet)
    print(json.dumps(report, indent=2))
    if not report["finished"]:
        print(f"stopped after {report['steps']} steps (--max-minutes); run the same command to resume", file=sys.stderr)
        return 0
    if ns.ship:
        ship = Path(ns.ship)
        ship.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "stage.json"):
            shutil.copy2(out / name, ship / name)
        ns.stage = [f"hf:path={ship}", "smollm2"]
        _eval_defaults(ns)
        evaluation = _evaluate(ns.stage, ns)
        info = json.loads((ship / "stage.json").read_text())
        info["training"] = report
        info["evaluation"] = evaluation
        (ship / "stage.json").write_text(json.dumps(info, indent=2) + "\n")
        print(_eval_markdown(evaluation))
        print(f"feature head written to {ship}")
    return 0
