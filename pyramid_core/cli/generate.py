"""``pyramid generate``: one generation with a multi-stage pipeline, optionally next to plain HF
``generate`` of the target."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import attrs

from pyramid_core import plugins
from pyramid_core.cli.common import (
    compile_arg,
    int_at_least,
    nonfinite_arg,
    pipeline_args,
    pipeline_spec,
    sampling_args,
)
from pyramid_core.cli.config import config_arg, run_arguments
from pyramid_core.errors import ConfigError
from pyramid_core.protocols import tokenizer_of

__all__ = ["configure"]


def configure(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument("--prompt", required=True)
    p.add_argument("--stage", action="append", metavar="STAGE",
                   help="a stage, smallest first, repeated; NAME[:key=value,...] naming a proposer "
                        "(e.g. ngram) or a backend (e.g. smollm2, hf:path=DIR). Default: the default chain "
                        "(the distilled family smollm2:stage=draft, smollm2:stage=qualifier, smollm2)")
    pipeline_args(p, default_length="4; the default chain's own without --stage")
    p.add_argument("--tree", metavar="TREE",
                   help="draft token trees with the first stage, e.g. tree:branching=4-2-1,replacement=false "
                        "or tree:budget=16,branching=4 (verify them with the exact policy)")
    p.add_argument("--max-new-tokens", type=int_at_least(0), default=64)
    p.add_argument("--device", help="device for the model backends (cpu, cuda, ...)")
    compile_arg(p)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the tokenizer's chat template (default on)")
    p.add_argument("--compare", action="store_true",
                   help="also time plain HF generate of the target alone (and check greedy identity)")
    config_arg(p)
    p.add_argument("--metrics", metavar="FILE.json",
                   help="write metrics as JSON (checked before anything runs; written right after the generation, "
                        "again with --compare's results)")
    nonfinite_arg(p)
    sampling_args(p, default_temperature=0.0)
    return run


def run(ns: argparse.Namespace) -> int:
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.outputs import json_text, output_file
    from pyramid_core.lab.prompts import encode_prompt
    from pyramid_core.lab.provenance import run_record

    arguments = run_arguments(ns)
    metrics_path = output_file(ns.metrics, "--metrics") if ns.metrics else None
    if ns.compare and ns.max_new_tokens < 1:
        raise ConfigError(f"--compare times HF generate, which needs --max-new-tokens >= 1, got {ns.max_new_tokens}")
    regs = plugins.registries()
    spec = pipeline_spec(ns, ns.stage or (), tree=ns.tree, device=ns.device)
    stages, policies, _ = spec.parts(regs)
    stage_specs = [str(s) for s in stages]
    pipe = spec.resolve(regs)
    tok = tokenizer_of(pipe.target)
    if tok is None:
        raise ConfigError(f"the target stage {stage_specs[-1]!r} has no tokenizer; `generate` needs text")
    ids = encode_prompt(tok, ns.prompt, ns.chat)
    if not ids:
        raise ConfigError("the prompt is empty after tokenisation")
    gen = pipe.generate(ids, ns.max_new_tokens, seed=ns.seed)
    m = gen.metrics
    print(tok.decode(gen.token_list, skip_special_tokens=True))
    print()
    print(f"{m.new_tokens} tokens in {m.wall_s:.2f} s = {m.tokens_per_s:.1f} tokens/s; "
          f"{m.tokens_per_target_forward:.2f} tokens per target forward; "
          f"framework overhead {100 * m.overhead_s / m.wall_s:.1f}% of wall time")
    for k, b in enumerate(m.boundaries):
        print(f"boundary {k + 1}->{k + 2} ({stage_specs[k]} -> {stage_specs[k + 1]}): proposed {b.proposed}, "
              f"accepted {b.accepted}: acceptance per try {100 * b.acceptance_per_try:.1f}%, accepted/proposed "
              f"{100 * b.accepted_per_proposed:.1f}%, mean accepted length {b.mean_accepted:.2f}")
        if b.tree_rounds:
            print(f"  token trees: {b.tree_nodes / b.tree_rounds:.1f} nodes per tree, proposed/accepted count "
                  f"depths; {100 * b.accepted / b.tree_nodes:.1f}% of the nodes were used")
    if m.lookup is not None:
        where = "every round, the lookup's block grafted beside it" if ns.lookup_graft else "the others"
        print(f"lookup {ns.lookup}: proposed in {m.lookup.hits} of {m.lookup.tries} rounds ({m.lookup.proposed} tokens); "
              f"{stage_specs[0]} drafted in {where}")
    for s in m.stages:
        if s.forwards == 0 and s is m.stages[0] and len(m.stages) > 1:
            print(f"stage {s.name}: model-free proposer (no forwards)")
        else:
            print(f"stage {s.name}: {s.forwards} forwards, {s.forward_s:.2f} s")
    report: dict[str, Any] = {
        "stages": stage_specs, "metrics": m.as_dict(), "tokens": gen.token_list,
        "spec": {"stages": stage_specs, "policies": [p if isinstance(p, str) else type(p).__name__ for p in policies],
                 "block_lengths": list(pipe.block_lengths), "tree": ns.tree, "sampling": attrs.asdict(pipe.sampling),
                 "length_schedule": pipe.length_schedule, "confidence_stop": pipe.confidence_stop,
                 "lookup": ns.lookup, "lookup_graft": ns.lookup_graft},
        "run": run_record("pyramid generate", arguments, pipe.stages),
    }
    rc = 0
    if metrics_path is not None:  # now: --compare may fail after this
        metrics_path.write_text(json_text(report, indent=2))
    if ns.compare:
        report["hf_generate"], rc = _compare(pipe, ids, gen.token_list, m.tokens_per_s, ns)
        if metrics_path is not None:
            metrics_path.write_text(json_text(report, indent=2))
    return rc


def _compare(pipe: Any, ids: list[int], tokens: list[int], tokens_per_s: float,
             ns: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Plain HF ``generate`` of the target on the same prompt -- eager, and over the stage's
    compiled runner where it has one -- timed, the pipeline's speedup over the faster of them,
    and greedy identity within the target's dtype (a divergence at a numerical tie of the dtype
    is reported as such, not as a failure: ``lab.bench.identity``)."""
    # lazy: the hf backend loads with its plugin
    from pyramid_core.backends.hf.baseline import run_baselines
    from pyramid_core.backends.hf.stage import HFStage
    from pyramid_core.lab.bench.identity import first_divergence

    if not isinstance(pipe.target, HFStage):
        raise ConfigError("--compare needs a Hugging Face target stage")
    runs = run_baselines(pipe.target, [ids], max_new_tokens=ns.max_new_tokens, stop_ids=pipe.stop_ids,
                         sampling=pipe.sampling, seed=ns.seed, compiled=True)
    failed = [r for r in runs if not r.ran]
    if failed:
        raise ConfigError(f"HF generate of the target failed ({failed[0].label}): {failed[0].note}")
    print()
    table = {}
    for r in runs:
        tps = len(r.outputs[0]) / r.wall_s
        table[r.label] = {"tokens": len(r.outputs[0]), "wall_s": r.wall_s, "tokens_per_s": tps}
        print(f"{r.label}: {len(r.outputs[0])} tokens in {r.wall_s:.2f} s = {tps:.1f} tokens/s")
    fastest = max(table, key=lambda k: table[k]["tokens_per_s"])
    speedup = tokens_per_s / table[fastest]["tokens_per_s"]
    dtype = str(pipe.target.dtype).removeprefix("torch.")
    print(f"pipeline speedup over the fastest ({fastest}, {dtype}): {speedup:.2f}x")
    out: dict[str, Any] = {**table[fastest], "baseline": fastest, "dtype": dtype, "speedup": speedup,
                           "configurations": table}
    if not pipe.sampling.is_greedy:
        return out, 0
    ref = list(runs[0].outputs[0])  # eager: the reference text
    d = first_divergence(pipe.target, ids, ref, tokens)
    same = d is None or d.tie
    where = "" if d is None else (f" (left HF's text at new token {d.position}, a numerical tie of {dtype}: "
                                  f"logit margin {d.margin:.3g})" if d.tie else f" (from new token {d.position})")
    print("greedy output token-identical to HF generate: " + ("yes" if same else "NO") + where)
    out["identical"] = same
    out["tie"] = None if d is None else {"position": d.position, "margin": d.margin} if d.tie else None
    return out, 0 if same else 3
