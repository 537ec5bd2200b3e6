"""``pyramid plan``: measure candidates on this machine and pick the chain and block lengths."""

from __future__ import annotations

import argparse
import shlex
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyramid_core import plugins
from pyramid_core.build import PipelineSpec, default_chain
from pyramid_core.channel import reader_of
from pyramid_core.cli.argtypes import quality_budgets
from pyramid_core.cli.common import (
    compile_arg,
    int_at_least,
    sampling,
    sampling_args,
    show_progress,
)
from pyramid_core.cli.config import config_arg, run_arguments
from pyramid_core.errors import ConfigError
from pyramid_core.protocols import Stage, tokenizer_of
from pyramid_core.registry import parse_spec

if TYPE_CHECKING:
    from pyramid_core.lab.budget import BudgetGrid

__all__ = ["configure"]


def configure(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument("--stage", action="append", metavar="STAGE",
                   help="a candidate, repeated; the last is the target. Model backends (e.g. "
                        "smollm2:num_layers=12, hf:path=DIR), model-free proposers (e.g. ngram) or feature "
                        "drafts (smollm2:stage=feature), which draft at the bottom of a chain only")
    p.add_argument("--prompts", help="JSONL or text prompt file (default: the project's prompt set)")
    p.add_argument("--per-kind", type=int_at_least(1), default=1, help="prompts per task kind (default 1); with --quality-budget, the tuning prompts")
    p.add_argument("--new-tokens", "--max-new-tokens", dest="new_tokens", type=int_at_least(1), default=32,
                   help="tokens per prompt: greedy tokens to measure alpha, or with --quality-budget the new tokens "
                        "of each sampled text (default 32)")
    p.add_argument("--max-length", type=int_at_least(1), default=16, help="longest block length considered (default 16)")
    p.add_argument("--feature-length", type=int_at_least(1), default=4,
                   help="block length at which a feature draft's effective alpha is measured (default 4)")
    p.add_argument("--max-stages", type=int_at_least(1), default=None, help="longest chain considered (default: all candidates)")
    p.add_argument("--top", type=int_at_least(1), default=10, help="chains in the ranking (default 10)")
    p.add_argument("--repeats", type=int_at_least(1), default=10, help="timed forwards per model and tokens per forward M (default 10)")
    p.add_argument("--device", help="device for the model backends (cpu, cuda, ...)")
    compile_arg(p)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", action="store_true", help="print one JSON object (with the run: arguments and versions)")
    config_arg(p)
    g = sampling_args(p, 1.0, title="--quality-budget: the fastest configuration, lossy rules included, within a price",
                      temperature_help="sampling temperature of the measured texts (default 1.0)", seed=False)
    g.add_argument("--quality-budget", type=quality_budgets, metavar="NATS[,NATS...]",
                   help="search fuzzy / psd-a / psd-f thresholds and block lengths, exact chains and the target alone "
                        "over the --stage chain (2 or 3 stages; default: the default chain) and choose the fastest "
                        "whose price's 95%% upper bound is at most NATS nats/token (conservative), checked on held-out "
                        "prompts; several budgets, comma-separated, share one search")
    g.add_argument("--preset", metavar="NAME",
                   help="with --quality-budget: calibrate this preset's budgeted form (e.g. psd-f): its fuzzy "
                        "thresholds and block lengths chosen within each budget for these stages and this sampler, "
                        "and recorded, so that `pyramid generate --preset NAME:budget=NATS` with the same --stage "
                        "and sampling options runs the choice (records: $PYRAMID_BUDGETS, default "
                        "$PYRAMID_HOME/budgets.json)")
    g.add_argument("--seeds", type=int_at_least(1), default=2, help="seeds per prompt (default 2)")
    g.add_argument("--heldout-per-kind", type=int_at_least(1), default=1,
                   help="held-out prompts per task kind: the next ones of each kind after the --per-kind tuning "
                        "prompts (default 1)")
    g.add_argument("--taus", default="0.1,0.3,0.5",
                   help="comma-separated fuzzy thresholds (JS, nats) tried at every fuzzy boundary (default 0.1,0.3,0.5)")
    g.add_argument("--length-grid", action="append", metavar="L[,L2]",
                   help="block lengths of one grid point: one for the 2-stage chains, two for the 3-stage ones; "
                        "repeat for more (default 4; 8; 4,8; 8,16)")
    return run


def run(ns: argparse.Namespace) -> int:
    """Measure T per candidate and alpha per pair here, then pick the chain (pyramid_core.lab.planner)."""
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.measure import measure_candidates
    from pyramid_core.lab.outputs import json_text
    from pyramid_core.lab.planner import plan_chain
    from pyramid_core.lab.prompts import encode_prompt, load_prompts
    from pyramid_core.lab.provenance import run_record

    arguments = run_arguments(ns)
    if ns.quality_budget is not None:
        return _run_budget(ns, arguments)
    if ns.preset is not None:
        raise ConfigError(f"--preset {ns.preset!r} is calibrated within a quality budget: add --quality-budget NATS")
    specs: list[str] = ns.stage or []
    if not specs:
        raise ConfigError("give the candidates as --stage NAME[:k=v,...], repeated, the target last "
                          "(e.g. --stage ngram --stage smollm2:num_layers=12 --stage smollm2)")
    twice = sorted({s for s in specs if specs.count(s) > 1})
    if twice:
        raise ConfigError(f"--stage {twice[0]!r} is given twice; each candidate once")
    regs = plugins.registries()
    if parse_spec(specs[-1])[0] in regs.proposers:
        raise ConfigError(f"the target (the last --stage, {specs[-1]!r}) must be a model backend, not a proposer")
    # loaded as one pipeline's stages are: the target first, every model on --device
    candidates = PipelineSpec(tuple(specs), device=ns.device, compile=ns.compile, dtype=ns.dtype).load_stages(regs)
    target = candidates[-1]
    assert isinstance(target, Stage)
    tok = tokenizer_of(target)
    if tok is None:
        raise ConfigError(f"the target {specs[-1]!r} has no tokenizer; `plan` encodes text prompts")
    prompts = load_prompts(ns.prompts, per_kind=ns.per_kind)
    encoded = [encode_prompt(tok, p.text, ns.chat) for p in prompts]
    eos = getattr(tok, "eos_token_id", None)
    t0 = time.perf_counter()
    # every M a verification can feed: each block length is charged its own measured T(ell + 1)
    measured = measure_candidates(candidates, specs, encoded, ns.new_tokens, proposer_length=ns.max_length,
                                  feature_length=ns.feature_length, repeats=ns.repeats, stop_ids=[] if eos is None else [int(eos)],
                                  block_sizes=range(1, ns.max_length + 2), regs=regs)
    elapsed = time.perf_counter() - t0
    feats = [n for n, c in zip(specs, candidates) if n in measured.proposers and reader_of(c) is not None]
    free = [n for n in measured.proposers if n not in feats]
    plan = plan_chain(specs, measured.forward_costs, measured.alpha, proposers=measured.proposers,
                      max_length=ns.max_length, max_stages=ns.max_stages, top=ns.top)
    command = shlex.join(["pyramid", "generate", *plan.best.generate_args(),
                          *(["--device", ns.device] if ns.device else []),
                          *([] if ns.chat else ["--no-chat"]), "--prompt", "YOUR PROMPT"])
    if ns.json:
        print(json_text({**plan.as_dict(), "command": command, "prompts": len(prompts),
                          "new_tokens": ns.new_tokens, "measure_s": elapsed,
                          "run": run_record("pyramid plan", arguments, candidates)}))
        return 0
    print(plan.to_markdown())
    print(f"Measured here in {elapsed:.1f} s: T(M) = median forward feeding M tokens, M = 1..{ns.max_length + 1} "
          f"(a block of ℓ is verified at M = ℓ + 1); α = greedy agreement along the "
          f"verifier's own continuation ({len(prompts)} prompt(s) x {ns.new_tokens} tokens)"
          + (f"; proposers ({', '.join(free)}): T = 0, effective α of a 2-stage run at length {ns.max_length}"
             if free else "")
          + (f"; feature drafts ({', '.join(feats)}): T(M) measured, effective α of a 2-stage run at length "
             f"{ns.feature_length}, first stage only" if feats else "") + ".")
    modes = ", ".join(f"{getattr(c, 'name', n)}: {getattr(c, 'mode_summary', '-')}" for n, c in zip(specs, candidates)
                      if hasattr(c, "mode_summary"))
    print(f"Stages in {str(getattr(target, 'dtype', '-')).removeprefix('torch.')}; execution modes: {modes or '-'}.")
    print(f"\nbest: {' → '.join(plan.chain)}, lengths {list(plan.block_lengths)}: predicted "
          f"{plan.tokens_per_s:.1f} tokens/s, {plan.speedup:.2f}x the target alone (the speculation gain: over "
          "pyramid's own N = 1 in the same dtype and modes; `pyramid bench` measures it against HF)")
    print(command)
    return 0


def _budget_grid(ns: argparse.Namespace) -> BudgetGrid:
    from pyramid_core.lab.budget import BudgetGrid

    try:
        taus = [float(t) for t in ns.taus.split(",")]
    except ValueError:
        raise ConfigError(f"--taus takes comma-separated numbers (e.g. 0.1,0.3), got {ns.taus!r}") from None
    points = []
    for g in ns.length_grid or ():
        try:
            points.append([int(v) for v in g.split(",")])
        except ValueError:
            raise ConfigError(f"--length-grid takes comma-separated integers per grid point, got {g!r}") from None
    try:
        return BudgetGrid(taus, points) if points else BudgetGrid(taus)
    except ConfigError as exc:
        raise ConfigError(f"--taus / --length-grid: {exc}") from None


def _run_budget(ns: argparse.Namespace, arguments: dict[str, Any]) -> int:
    """``--quality-budget``: the fastest configuration within each budget (pyramid_core.lab.budget);
    with ``--preset``, the preset's budgeted form, recorded."""
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.build import resolve_preset
    from pyramid_core.lab.budget import calibrate_preset, plan_within_budgets, split_prompts
    from pyramid_core.lab.outputs import json_text
    from pyramid_core.lab.prompts import load_prompts
    from pyramid_core.lab.provenance import run_record

    regs = plugins.registries()
    specs = [str(s) for s in (ns.stage or default_chain(regs, purpose="--quality-budget plans over the default "
                                                                         "chain without --stage").stages)]
    if len(specs) not in (2, 3):
        raise ConfigError(f"--quality-budget plans over 2 or 3 stages (smallest first, the target last), got "
                          f"{len(specs)}: give --stage 2 or 3 times")
    if ns.preset is not None:
        resolve_preset(ns.preset, len(specs), regs=regs)  # the name and stage count, before any loading
    grid = _budget_grid(ns)
    tune, held = split_prompts(load_prompts(ns.prompts, per_kind=ns.per_kind + ns.heldout_per_kind),
                               ns.per_kind, ns.heldout_per_kind)
    options: dict[str, Any] = dict(sampling=sampling(ns), seeds=range(ns.seeds), max_new_tokens=ns.new_tokens,
                                   grid=grid, chat=ns.chat, regs=regs, progress=show_progress(ns))
    t0 = time.perf_counter()
    recorded = []
    if ns.preset is not None:
        # loaded by calibrate_preset from the specs, which key the record
        pairs = calibrate_preset(ns.preset, specs, ns.quality_budget, tune, held, names=specs, device=ns.device,
                                 compile=ns.compile, dtype=ns.dtype, command=shlex.join(["pyramid", *getattr(ns, "argv", ["plan"])]), **options)
        plans = [p for p, _ in pairs]
        recorded = [r for _, r in pairs]
        loaded: list[Any] = []
    else:
        loaded = PipelineSpec(tuple(specs), device=ns.device, compile=ns.compile, dtype=ns.dtype).load_stages(regs)
        plans = plan_within_budgets(loaded, ns.quality_budget, tune, held, names=specs, **options)
    elapsed = time.perf_counter() - t0
    commands = [p.generate_command(device=ns.device, chat=ns.chat) for p in plans]
    split = (f"per task kind, in file order: the first {ns.per_kind} tune, the next {ns.heldout_per_kind} are held out")
    if ns.json:
        body = [{**p.as_dict(), "command": c} for p, c in zip(plans, commands, strict=True)]
        print(json_text({**(body[0] if len(body) == 1 else {"plans": body}), "split": split,
                         "tuning": [p.id for p in tune], "heldout": [p.id for p in held], "measure_s": elapsed,
                         "recorded": [r.as_dict() for r in recorded],
                         "run": run_record("pyramid plan", arguments, loaded)}))
        return 0
    for k, (plan, command) in enumerate(zip(plans, commands, strict=True)):
        if k == 0:
            print(plan.to_markdown())
        else:  # the same search: the frontier once, then each budget's choice and validation
            print(f"\n## Budget {plan.budget:g} nats/token\n")
            print(plan.to_markdown(frontier=False))
        print(command)
    print(f"\nPrompts {split} ({len(tune)} tuning, {len(held)} held-out); measured here in {elapsed:.1f} s.")
    if recorded:
        from pyramid_core.calibrated import store_path

        print(f"Recorded in {store_path()}: " + "; ".join(
            f"{r.key.preset}:budget={r.key.budget:g} -> {', '.join(r.policies)}, lengths "
            f"{','.join(map(str, r.block_lengths))}" for r in recorded))
    return 0
