"""``pyramid bench`` and ``pyramid sweep``: measured runs over the project's prompt set."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from pyramid_core import plugins
from pyramid_core.build import check_lookup, default_chain, make_stage
from pyramid_core.cli.argtypes import quality_budget
from pyramid_core.cli.common import (
    block_length,
    compile_arg,
    int_at_least,
    nonfinite_arg,
    pipeline_spec,
    sampling,
    sampling_args,
    show_progress,
)
from pyramid_core.cli.config import config_arg, run_arguments
from pyramid_core.devices import check_device
from pyramid_core.errors import ConfigError, PyramidError
from pyramid_core.protocols import Stage
from pyramid_core.validate import check_block_lengths

if TYPE_CHECKING:
    from pyramid_core.lab.bench import BenchConfig
    from pyramid_core.lab.outputs import RecordLog

__all__ = ["configure_bench", "configure_sweep", "bench_configurations", "bench_plan", "BenchPlan"]

_log = logging.getLogger(__name__)


def configure_bench(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument("--target", metavar="STAGE", help="target backend (default: the default chain's target, smollm2)")
    p.add_argument("--draft", "--stage", dest="draft", metavar="STAGE",
                   help="draft backend for draft->target, HF assisted and the trees (default: the default "
                        "chain's first stage, smollm2:stage=draft)")
    p.add_argument("--qualifier", metavar="STAGE",
                   help="qualifier backend for the 3-stage rows and HF assisted; 'none' drops them (default: the "
                        "default chain's middle stage, smollm2:stage=qualifier)")
    p.add_argument("--ngram", default="ngram", metavar="STAGE", help="model-free proposer (default ngram)")
    p.add_argument("--tree", default="tree:budget=8,branching=4", metavar="TREE", help="tree wrapper spec")
    p.add_argument("--lookup", default="ngram", metavar="PROPOSER",
                   help="model-free proposer asked first each round in the lookup rows (draft and feature chains, "
                        "the feature tree), the draft drafting only where it proposes nothing, and grafted into the "
                        "feature head's chain and tree in the graft rows; 'none' drops those rows (default ngram)")
    p.add_argument("--feature", metavar="STAGE",
                   help="feature-level draft (EAGLE family) for the feature rows, on Spec-Bench questions too; 'none' drops "
                        "them (default: smollm2:stage=feature when the target is the family's and the head is "
                        "shipped)")
    p.add_argument("--feature-length", type=block_length, default=2, metavar="L",
                   help="block length of the feature->target rows (default 2: `pyramid plan`'s choice for the "
                        "shipped head on a 2-core CPU)")
    p.add_argument("--feature-tree", default="tree:budget=8,branching=4", metavar="TREE",
                   help="tree wrapper spec of the tree feature->target rows")
    p.add_argument("--feature-tree-length", type=block_length, metavar="L",
                   help="how deep the tree feature->target rows grow (default: --feature-length), e.g. 6 with "
                        "--feature-tree tree:budget=60,beam=10,branching=10 for EAGLE-2's own tree")
    p.add_argument("--lengths-2", dest="lengths2", metavar="L",
                   help="block length of the draft->target rows (default: the default chain's first)")
    p.add_argument("--lengths-3", dest="lengths3", metavar="L1,L2",
                   help="block lengths of the 3-stage rows, L1 <= L2 (default: the default chain's)")
    p.add_argument("--qualifier-length", type=block_length, metavar="L",
                   help="block length of the qualifier->target row (default: the 3-stage rows' second length)")
    p.add_argument("--prompt-lookup-tokens", type=int_at_least(1), default=10,
                   help="HF prompt_lookup_num_tokens (default 10)")
    p.add_argument("--prompts", help="JSONL or text prompt file (default: the project's prompt set), or a Spec-Bench "
                                     "question file (data/spec_bench/question.jsonl): then every method answers its "
                                     "questions turn by turn and Spec-Bench answer files are written")
    p.add_argument("--per-kind", type=int_at_least(1), default=1, help="prompts per task kind (default 1)")
    p.add_argument("--per-group", type=int_at_least(1), default=None, metavar="N",
                   help="Spec-Bench: the first N questions of each group (mt_bench, translation, summarization, qa, "
                        "math_reasoning, rag); default all 480")
    p.add_argument("--on-too-long", choices=("error", "skip"), default="error",
                   help="Spec-Bench: a question beyond the target's context length is an error (default) or skipped")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=None, help="default 64 (24 with --quick)")
    p.add_argument("--quick", action="store_true", help="2 prompts, 24 new tokens")
    p.add_argument("--device", help="device for the model backends (cpu, cuda, ...)")
    compile_arg(p)
    p.add_argument("--hf-compile", action="store_true",
                   help="also time HF generate with its static cache and torch.compile (as transformers documents "
                        "it; on a CPU compiling takes about a minute per distinct prompt length)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
    g = sampling_args(p, 0.0, title="sampling (default greedy, with greedy identity asserted)",
                      temperature_help="> 0: a sampled bench with quality (NLL vs target)", seed=False)
    g.add_argument("--seeds", type=int_at_least(1), default=3, help="seeds per prompt when sampling (default 3)")
    config_arg(p)
    p.add_argument("--out", default="out/bench",
                   help="output folder for bench.json, bench.md, bench.png; checked before anything runs. Each "
                        "finished configuration is also appended to bench.partial.jsonl there, and a rerun with the "
                        "same arguments resumes from it. One run at a time per folder (a lock file, .pyramid.lock)")
    return run_bench


def _lengths(value: str | None, n: int, flag: str) -> list[int] | None:
    if not value:
        return None
    try:
        out = [int(v) for v in value.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, got {value!r}") from None
    if len(out) != n:
        raise ConfigError(f"{flag} needs {n} comma-separated block length(s), got {value!r}")
    try:
        return check_block_lengths(out)
    except ConfigError as exc:
        raise ConfigError(f"{flag} {value}: {exc}") from None


def _guarded(ns: argparse.Namespace, command: str, body: Callable[[Path, list[RecordLog]], int]) -> int:
    """``body(out, logs)`` with ``--out`` checked and locked (``outputs.RunLock``: a second run
    on the same folder is refused, naming the first); on Ctrl-C, says what the partial log
    ``body`` opened (appended to ``logs``) keeps and how to resume, and returns 130."""
    import shlex

    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.outputs import RunLock, output_dir

    out = output_dir(ns.out, "--out")  # before anything runs
    logs: list[RecordLog] = []
    with RunLock(out, f"pyramid {command}") as lock:
        if lock.took_over_text:
            _log.warning("%s", lock.took_over_text)
        try:
            return body(out, logs)
        except KeyboardInterrupt:
            again = shlex.join(["pyramid", *ns.argv])
            if not logs:
                print(f"pyramid {command}: interrupted before any result was recorded; run `{again}` to start "
                      "again", file=sys.stderr)
            else:
                # the references every configuration is compared with are a piece, not a configuration
                n = sum(1 for key in logs[0].done if key not in ("reference", "refs"))
                print(f"pyramid {command}: interrupted; {logs[0].path} keeps {n} finished configuration(s); "
                      f"run the same command to resume from there: {again}", file=sys.stderr)
            return 130


def run_bench(ns: argparse.Namespace) -> int:
    return _guarded(ns, "bench", lambda out, logs: _run_bench(ns, out, logs))


@attrs.frozen
class BenchPlan:
    """What ``pyramid bench`` runs, from its arguments alone (nothing loaded): the stage spec per
    role (``None``: no qualifier), the block lengths, the new tokens per prompt."""

    specs: dict[str, str | None]  # "--target", "--draft", "--qualifier"
    lengths2: list[int] | None
    lengths3: list[int] | None
    upper: int  # the qualifier's block length in the 3-stage feature row
    specbench: bool
    max_new: int


def bench_plan(ns: argparse.Namespace, regs: Any) -> BenchPlan:
    """The roles, lengths and token budget of a bench run (the default chain fills what is not given)."""
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.specbench import is_specbench_file

    lengths2, lengths3 = _lengths(ns.lengths2, 1, "--lengths-2"), _lengths(ns.lengths3, 2, "--lengths-3")
    if _lookup(ns) is not None:
        try:
            check_lookup(ns.lookup, 2, regs)
        except PyramidError as exc:
            raise ConfigError(f"--lookup {ns.lookup}: {exc}") from None
    specbench = bool(ns.prompts) and is_specbench_file(ns.prompts)
    max_new = 24 if ns.quick else (128 if specbench else 64)
    max_new = ns.max_new_tokens if ns.max_new_tokens is not None else max_new
    needs_chain = not (ns.target and ns.draft and ns.qualifier and ns.lengths2 and ns.lengths3)
    chain = default_chain(regs, purpose="`pyramid bench` takes the stages and lengths not given from it") \
        if needs_chain else None
    stages = list(chain.stages) if chain is not None else []
    given = {"--target": ns.target or (stages[-1] if stages else None),
             "--draft": ns.draft or (stages[0] if len(stages) > 1 else None),
             "--qualifier": ns.qualifier or (stages[1] if len(stages) == 3 else "none")}
    specs: dict[str, str | None] = {}
    for flag, spec in given.items():
        if spec is None or str(spec).lower() == "none":
            if flag != "--qualifier":
                raise ConfigError(f"give {flag}: the default chain has no stage for it")
            specs[flag] = None
        else:
            specs[flag] = str(spec)
    chain_lengths = list(chain.block_lengths) if chain is not None else []
    lengths2 = lengths2 or chain_lengths[:1] or None
    lengths3 = lengths3 or (chain_lengths if len(chain_lengths) == 2 else None)
    upper = ns.qualifier_length or (lengths3[1] if lengths3 else 8)
    return BenchPlan(specs, lengths2, lengths3, upper, specbench, max_new)


def _pyramid_configs(ns: argparse.Namespace, plan: BenchPlan, stages: dict[str, Any], regs: Any,
                     *, load: bool) -> list[BenchConfig]:
    """The pyramid rows of ``plan`` over ``stages`` (a role's loaded stage, or its spec when
    ``load`` is false: then nothing is loaded and the rows describe the run)."""
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.bench import default_configs

    rows = default_configs(stages["--target"], stages["--draft"], qualifier=stages["--qualifier"], ngram=ns.ngram,
                           tree=ns.tree, lengths2=plan.lengths2, lengths3=plan.lengths3,
                           qualifier_length=ns.qualifier_length, lookup=_lookup(ns))
    return rows + _feature_rows(ns, plan.specs["--target"], stages["--target"], stages["--qualifier"], regs,
                                upper=plan.upper, load=load)


def bench_configurations(ns: argparse.Namespace, regs: Any = None) -> list[dict[str, Any]]:
    """The pyramid configurations ``pyramid bench`` with these arguments runs (label, stage
    specs, policies, block lengths, tree, ...), built without loading a model: what bench.json
    records, and what a rerun from it (``--config bench.json``) builds again."""
    regs = regs or plugins.registries()
    plan = bench_plan(ns, regs)
    if plan.specbench:
        return []
    return [cfg.describe() for cfg in _pyramid_configs(ns, plan, dict(plan.specs), regs, load=False)]


def _run_bench(ns: argparse.Namespace, out: Path, logs: list[RecordLog]) -> int:
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.bench import run_bench, write_bench
    from pyramid_core.lab.prompts import load_prompts
    from pyramid_core.lab.provenance import run_record

    arguments = run_arguments(ns)
    if ns.device:
        check_device(ns.device)
    regs = plugins.registries()
    plan = bench_plan(ns, regs)
    if not plan.specbench:
        prompts = load_prompts(ns.prompts, per_kind=1 if ns.quick else ns.per_kind)
        if ns.quick:
            prompts = prompts[:2]
    loaded: dict[str, Any] = {}
    for flag, spec in plan.specs.items():
        if spec is None:
            loaded[flag] = None
            continue
        stage = make_stage(spec, regs=regs, device=ns.device, compile=ns.compile, dtype=ns.dtype)
        if not isinstance(stage, Stage):
            raise ConfigError(f"{flag} ({spec}) must be a model backend, not a proposer")
        loaded[flag] = stage
    target, draft = loaded["--target"], loaded["--draft"]
    assert target is not None and draft is not None
    if plan.specbench:
        extra = _feature_rows(ns, plan.specs["--target"], target, loaded["--qualifier"], regs, upper=plan.upper)
        return _specbench(ns, out, target, draft, loaded["--qualifier"], plan.max_new, plan.lengths2, plan.lengths3,
                          regs, arguments, extra)
    described = [cfg.describe() for cfg in _pyramid_configs(ns, plan, dict(plan.specs), regs, load=False)]
    configs = _pyramid_configs(ns, plan, loaded, regs, load=True)
    log = _open_log(out / "bench.partial.jsonl", arguments, "bench", logs)
    result = run_bench(target, draft, prompts, max_new_tokens=plan.max_new, ngram=ns.ngram, tree=ns.tree,
                       lengths2=plan.lengths2, lengths3=plan.lengths3,
                       qualifier=loaded["--qualifier"], qualifier_length=ns.qualifier_length,
                       prompt_lookup_tokens=ns.prompt_lookup_tokens, chat=ns.chat, hf_compile=ns.hf_compile,
                       sampling=sampling(ns), seeds=ns.seeds, regs=regs, log=log, configs=configs,
                       progress=show_progress(ns))
    result.meta["configurations"] = described
    result.meta["run"] = run_record("pyramid bench", arguments, [s for s in loaded.values() if s is not None])
    files = write_bench(result, out)
    print(result.to_markdown())
    print("wrote " + ", ".join(str(f) for f in files) + f" (and {log.path}, one line per finished configuration)")
    if result.mismatches:
        print("pyramid bench: GREEDY OUTPUT MISMATCH: " + "; ".join(result.mismatches), file=sys.stderr)
        return 3
    return 0


def _feature_rows(ns: argparse.Namespace, target_spec: str | None, target: Any, qualifier: Any,
                  regs: Any, *, upper: int, load: bool = True) -> list[Any]:
    """The feature-draft rows (``bench.feature_configs``) for ``--feature``, or by default for
    the family's shipped head when the target is the family's own (``smollm2``); ``upper`` is
    the qualifier's block length in the 3-stage row (the 3-stage rows' second length)."""
    # lazy: the hf backend loads with its plugin; lab/ stays out of CLI start-up
    from pyramid_core.backends.hf.files import family_dir, family_installed
    from pyramid_core.lab.bench import feature_configs

    spec = ns.feature
    if spec is None:
        shipped = family_installed() and (family_dir() / "feature" / "stage.json").is_file()
        spec = "smollm2:stage=feature" if shipped and (target_spec or "").split(":")[0] == "smollm2" else "none"
    if spec.lower() == "none":
        return []
    if "features_from=" not in spec:  # the target's features in every row (in a 2-stage row, the next stage's)
        spec += ("," if ":" in spec else ":") + "features_from=target"
    stage: Any = spec  # without ``load``: the rows name the spec (``bench_configurations``)
    if load:
        stage = make_stage(spec, regs=regs, device=ns.device, compile=ns.compile, dtype=ns.dtype)
        if not isinstance(stage, Stage):
            raise ConfigError(f"--feature ({spec}) must be a model backend, not a proposer")
    return feature_configs(target, stage, qualifier=qualifier, length=ns.feature_length, tree=ns.feature_tree,
                           qualifier_length=upper, lookup=_lookup(ns), tree_length=ns.feature_tree_length)


def _lookup(ns: argparse.Namespace) -> str | None:
    """``--lookup``: the proposer of the lookup rows, or ``None`` for 'none'."""
    return None if ns.lookup.lower() == "none" else ns.lookup


def _open_log(path: Path, arguments: dict[str, Any], command: str, logs: list[RecordLog]) -> RecordLog:
    """The run's ``RecordLog`` (appended to ``logs``), identified by the run's arguments
    (``config.run_arguments``: every option, not the command line's plumbing); logs when it
    resumes, or when an old log of other arguments was moved aside."""
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.outputs import RecordLog

    log = RecordLog(path, arguments)
    logs.append(log)
    if log.moved_aside is not None:
        _log.info("%s keeps the partial results of a run with other arguments; starting afresh", log.moved_aside)
    elif log.done:
        _log.info("resuming: %d finished piece(s) taken from %s", len(log.done), log.path)
    return log


def _specbench(ns: argparse.Namespace, out: Path, target: Any, draft: Any, qualifier: Any, max_new: int,
               lengths2: list[int] | None, lengths3: list[int] | None, regs: Any, arguments: dict[str, Any],
               extra: Sequence[Any] = ()) -> int:
    """``pyramid bench --prompts question.jsonl``: the Spec-Bench run (``bench.run_specbench``),
    with the feature-draft rows ``extra``."""

    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.bench import run_specbench
    from pyramid_core.lab.outputs import json_text
    from pyramid_core.lab.provenance import run_record
    from pyramid_core.lab.specbench import load_questions

    questions = load_questions(ns.prompts, per_group=1 if ns.quick else ns.per_group)
    stages = [s for s in (target, draft, qualifier) if s]
    for cfg in extra:  # the feature head, once
        stages += [s for s in cfg.stages if isinstance(s, Stage) and all(s is not t for t in stages)]
    result = run_specbench(target, draft, questions, out / "specbench", qualifier=qualifier, max_new_tokens=max_new,
                           lengths2=lengths2, lengths3=lengths3, tree=ns.tree, on_too_long=ns.on_too_long, regs=regs,
                           progress=show_progress(ns), extra=extra)
    md = result.to_markdown()
    (out / "specbench.md").write_text(md)
    (out / "specbench.json").write_text(json_text({"baseline": result.baseline, "report": result.report,
                                                    "skipped": list(result.skipped),
                                                    "answer_files": [str(f) for f in result.files],
                                                    "run": run_record("pyramid bench", arguments, stages)},
                                                   indent=2))
    print(md)
    print("wrote " + ", ".join(str(f) for f in [out / "specbench.md", out / "specbench.json", *result.files]))
    return 0


def configure_sweep(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument("--preset", required=True, action="append",
                   help="fsd | psd-a | psd-f | sd (or a plugin's); repeat to plot several presets' frontiers")
    p.add_argument("--stage", action="append", metavar="STAGE",
                   help="stages smallest first (default: the default chain, the distilled SmolLM2 family)")
    p.add_argument("--taus", default="0.1,0.3,0.5,0.7", help="comma-separated tau values (every fuzzy boundary)")
    p.add_argument("--length-grid", action="append", metavar="L1,L2,...",
                   help="block lengths per boundary for one grid point; repeat for more (default: the preset's)")
    p.add_argument("--prompts", help="JSONL or text prompt file (default: the project's prompt set)")
    p.add_argument("--per-kind", type=int_at_least(1), default=2, help="prompts per task kind (default 2)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=32)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", help="device for the model backends (cpu, cuda, ...)")
    compile_arg(p)
    config_arg(p)
    p.add_argument("--out", default="out/sweep",
                   help="output folder for sweep.json, sweep.csv, sweep.png; checked before anything runs. Each "
                        "finished grid point is also appended to sweep.partial.jsonl there, and a rerun with the same "
                        "arguments resumes from it. One run at a time per folder (a lock file, .pyramid.lock)")
    nonfinite_arg(p)
    p.add_argument("--quality-budget", type=quality_budget, metavar="NATS",
                   help="a price budget in nats/token: drawn on sweep.png's price panel, and the fastest swept point "
                        "within it printed (a lossy point's price 95%% upper bound at most NATS; lossless ones always)")
    sampling_args(p, default_temperature=1.0)
    return run_sweep


def run_sweep(ns: argparse.Namespace) -> int:
    return _guarded(ns, "sweep", lambda out, logs: _run_sweep(ns, out, logs))


def _run_sweep(ns: argparse.Namespace, out: Path, logs: list[RecordLog]) -> int:
    import math

    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.prompts import load_prompts
    from pyramid_core.lab.provenance import run_record
    from pyramid_core.lab.sweep import run_sweep, write_sweep

    arguments = run_arguments(ns)  # before ns is changed below
    try:
        taus = [float(t) for t in ns.taus.split(",")]
    except ValueError:
        raise ConfigError(f"--taus takes comma-separated numbers (e.g. 0.1,0.3), got {ns.taus!r}") from None
    bad = [t for t in taus if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise ConfigError(f"--taus: a divergence threshold must be a finite number >= 0, got {bad[0]!r}")
    grid = None
    if ns.length_grid:
        grid = []
        for g in ns.length_grid:
            try:
                lengths = [int(v) for v in g.split(",")]
            except ValueError:
                raise ConfigError(f"--length-grid takes comma-separated integers per grid point, got {g!r}") from None
            try:
                grid.append(check_block_lengths(lengths))
            except ConfigError as exc:
                raise ConfigError(f"--length-grid {g}: {exc}") from None
    if ns.device:
        check_device(ns.device)
    regs = plugins.registries()
    prompts = load_prompts(ns.prompts, per_kind=ns.per_kind)
    presets = list(ns.preset)
    ns.policy, ns.length, ns.preset = None, None, presets[0]
    spec = pipeline_spec(ns, ns.stage or (), device=ns.device)
    n = len(spec.parts(regs)[0])  # the preset and the stage count, before anything is written
    if grid is not None:
        for g in grid:
            if len(g) != n - 1:
                raise ConfigError(f"--length-grid {','.join(map(str, g))}: {n} stages need {n - 1} block length(s)")
    # the budget changes no measurement: a sweep rerun with one resumes from the run without it
    measured = {k: v for k, v in arguments.items() if k != "quality_budget"}
    log = _open_log(out / "sweep.partial.jsonl", measured, "sweep", logs)
    points = run_sweep(spec, taus, prompts, length_grid=grid, max_new_tokens=ns.max_new_tokens, seed=ns.seed,
                       chat=ns.chat, presets=presets, regs=regs, log=log, progress=show_progress(ns))
    stages = [str(s) for s in spec.parts(regs)[0]]
    record = run_record("pyramid sweep", arguments) | {"stages": stages, "presets": presets, "taus": taus,
                                                       "length_grid": grid}
    files = write_sweep(points, out, title=f"{', '.join(presets)}: {' -> '.join(stages)}", run=record,
                        budget=ns.quality_budget)
    print(f"{'config':<14} {'tau':>5} {'lengths':>8} {'tok/s':>7} {'tok/fwd':>7} {'NLL':>6} {'price (95% CI)':>15} "
          f"{'exact':>6} {'agree':>6}  acceptance per try | accepted/proposed")
    for p in points:
        tau = "-" if p.tau is None else f"{p.tau:g}"
        per_try = " ".join(f"{a:.2f}" for a in p.acceptance_per_try)
        kept = " ".join(f"{a:.2f}" for a in p.acceptance)
        print(f"{p.label:<14} {tau:>5} {','.join(map(str, p.block_lengths)) or '-':>8} {p.tokens_per_s:>7.1f} "
              f"{p.tokens_per_target_forward:>7.2f} {p.nll:>6.3f} {f'{p.price:+.3f} ± {p.price_ci95:.3f}':>15} "
              f"{p.exact_match:>6.2f} {p.token_match:>6.2f}  {per_try or '-'} | {kept or '-'}")
    wide = [f"{p.label} tau={p.tau:g}" if p.tau is not None else p.label for p in points
            if math.isfinite(p.price_ci95) and p.price_ci95 > 0.1]
    if wide:
        print(f"price intervals wider than ±0.1 nats/token (more prompts or --max-new-tokens to decide at that "
              f"precision): {', '.join(wide)}")
    if ns.quality_budget is not None:
        print(_within_budget(points, ns.quality_budget))
    print("wrote " + ", ".join(str(f) for f in files) + f" (and {log.path}, one line per finished grid point)")
    return 0


def _within_budget(points: Any, budget: float) -> str:
    """The line naming the fastest swept point within ``budget``: lossless points always are, a
    lossy one when its price's 95% upper bound is at most the budget (``lab.budget``'s rule)."""
    import math

    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.budget import is_lossless

    def within(p: Any) -> bool:
        return is_lossless(p.policies) or (math.isfinite(p.price_ci95) and p.price + p.price_ci95 <= budget)

    best = max((p for p in points if within(p)), key=lambda p: p.tokens_per_s)
    tau = "" if best.tau is None else f" tau={best.tau:g}"
    lengths = f" lengths {','.join(map(str, best.block_lengths))}" if best.block_lengths else ""
    price = f"{best.price:+.3f} ± {best.price_ci95:.3f}"
    return (f"fastest within the quality budget {budget:g} nats/token (a lossy point's price 95% upper bound within "
            f"it, conservative): {best.label}{tau}{lengths}, {best.tokens_per_s:.1f} tokens/s, price {price}"
            + (" (lossless)" if is_lossless(best.policies) else ""))
