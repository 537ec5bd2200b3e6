"""``pyramid check``: exactness / distortion of a pipeline on explicit tables."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from pyramid_core import plugins
from pyramid_core.cli.argtypes import negative_numbers_are_values
from pyramid_core.cli.common import int_at_least, pipeline_args, sampling, sampling_args
from pyramid_core.errors import ConfigError
from pyramid_core.registry import split_top

__all__ = ["configure"]


def configure(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument("--dist", action="append", metavar="P1,P2,...",
                   help="next-token distribution of a stage, smallest first, once per stage")
    negative_numbers_are_values(p)  # "--dist -0.1,0.6,0.5" is a bad distribution, not an option
    pipeline_args(p, default_length="1")
    p.add_argument("--samples", type=int_at_least(1), default=20_000)
    p.add_argument("--new-tokens", type=int_at_least(1), default=1, metavar="N",
                   help="tokens per run, all counted (the tables ignore the context); default 1")
    p.add_argument("--tree", type=int_at_least(0, " (0 = a chain)"), default=0, metavar="K",
                   help="draft a token tree: K candidates per position up to the first block length "
                        "(also runs the chain draft to report the acceptance gain); 0 = chain")
    p.add_argument("--no-replacement", dest="replacement", action="store_false",
                   help="tree candidates drawn without replacement (Sequoia) instead of i.i.d. (SpecInfer)")
    p.add_argument("--compare", metavar="POLICY,POLICY,...",
                   help="run each policy (at every boundary) on the same tables and seeds and print one row per "
                        "rule, e.g. --compare exact,block (trees: --tree 3 --compare exact,traversal); nested specs "
                        "with parameters in parentheses")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    sampling_args(p, default_temperature=1.0)
    return run


def run(ns: argparse.Namespace) -> int:
    # lazy: scipy (seconds to import)
    from pyramid_core.lab.outputs import json_text  # lazy: lab is kept out of CLI start-up
    from pyramid_core.testing.exactness import parse_dist, run_check

    if not ns.dist:
        raise ConfigError("give one --dist per stage, smallest first (e.g. --dist 0.5,0.5 --dist 0.2,0.8)")
    dists = [parse_dist(d, name=f"--dist #{i + 1} (stage {i + 1})") for i, d in enumerate(ns.dist)]
    n = len(dists)
    regs = plugins.registries()
    if ns.compare:
        return _compare(ns, dists, regs)
    common = {"preset": ns.preset, "samples": ns.samples, "seed": ns.seed, "sampling": sampling(ns),
              "new_tokens": ns.new_tokens, "length_schedule": ns.length_schedule,
              "confidence_stop": ns.confidence_stop, "lookup": ns.lookup, "lookup_graft": ns.lookup_graft,
              "regs": regs}
    t0 = time.perf_counter()
    res = run_check(dists, ns.policy, ns.length, tree=ns.tree, replacement=ns.replacement, **common)
    elapsed = time.perf_counter() - t0
    chain = run_check(dists, ns.policy, ns.length, **common) if ns.tree else None  # the tree's gain
    # the per-token acceptance an exact chain boundary has in expectation: 1 - TV of its two rows
    rows = [sampling(ns).transform(torch.tensor(d, dtype=torch.float64).log().unsqueeze(0))[0] for d in dists]
    one_minus_tv = [float(torch.minimum(q, p).sum()) for q, p in zip(rows, rows[1:])]
    if ns.json:
        out = res.as_dict()
        out["elapsed_s"] = elapsed
        out["one_minus_tv"] = one_minus_tv
        if chain is not None:
            out["chain"] = chain.as_dict()
        print(json_text(out))
        return 0
    shape = "chain" if not ns.tree else (
        f"tree draft ({ns.tree} candidates per position, {'with' if ns.replacement else 'without'} replacement, "
        f"{res.mean_tree_nodes:.1f} nodes per tree)")
    print(f"{n}-stage pipeline, {shape}, policies {res.policies}, block lengths {res.block_lengths}, "
          f"{res.samples} samples x {res.new_tokens} tokens in {elapsed:.1f} s")
    print(f"{'token':>5} {'target':>8} {'empirical':>10}")
    for i, (t, e) in enumerate(zip(res.target, res.empirical, strict=True)):
        print(f"{i:>5} {t:>8.4f} {e:>10.4f}")
    print(f"TV distance  {res.tv:.4f}")
    print(f"chi-square p {res.p_value:.4g}" + ("   (exactness rejected at 1e-3)" if res.p_value < 1e-3 else ""))
    for k, (a, kept) in enumerate(zip(res.acceptance_per_try, res.accepted_per_proposed, strict=True)):
        # 1 - TV is the expected per-try acceptance of exact rejection sampling on a chain
        ref = "" if ns.tree and k == 0 else f" (1 - TV of the two tables {one_minus_tv[k]:.4f})"
        print(f"boundary {k + 1}->{k + 2}: acceptance per try {a:.4f}{ref}; accepted/proposed {kept:.4f}"
              + (f"   (chain draft: {chain.acceptance_per_try[k]:.4f} per try, "
                 f"{chain.accepted_per_proposed[k]:.4f} accepted/proposed)" if chain else ""))
    if ns.tree or ns.new_tokens > 1:
        for k, t in enumerate(res.tokens_per_forward[:-1]):
            print(f"output tokens per forward of stage {k + 2}: {t:.3f}"
                  + (f"   (chain draft: {chain.tokens_per_forward[k]:.3f})" if chain else ""))
        print(f"tokens per target forward {res.tokens_per_target_forward:.3f}"
              + (f"   (chain draft: {chain.tokens_per_target_forward:.3f})" if chain else ""))
    return 0


def _compare(ns: argparse.Namespace, dists: list[list[float]], regs: Any) -> int:
    """``--compare``: every rule on the same tables, lengths, sampling and seed."""
    from pyramid_core.lab.outputs import (  # lazy: lab is kept out of CLI start-up
        json_text,
        md_escape,
    )
    from pyramid_core.testing.exactness import run_check  # lazy: scipy (seconds to import)

    if ns.policy or ns.preset:
        raise ConfigError("--compare names the policies itself; drop --policy / --preset")
    rules = [r.strip() for r in split_top(ns.compare) if r.strip()]
    rules = [r[1:-1].strip() if r.startswith("(") and r.endswith(")") else r for r in rules]
    if not rules:
        raise ConfigError(f"--compare needs one or more policy specs, got {ns.compare!r}")
    n = len(dists)
    results = []
    for rule in rules:
        t0 = time.perf_counter()
        res = run_check(dists, [rule] * (n - 1), ns.length, samples=ns.samples, seed=ns.seed, sampling=sampling(ns),
                        tree=ns.tree, replacement=ns.replacement, new_tokens=ns.new_tokens,
                        length_schedule=ns.length_schedule, confidence_stop=ns.confidence_stop, lookup=ns.lookup,
                        lookup_graft=ns.lookup_graft, regs=regs)
        results.append((rule, res, time.perf_counter() - t0))
    if ns.json:
        print(json_text({"compare": [{"policy": rule, "elapsed_s": dt, **res.as_dict()} for rule, res, dt in results]}))
        return 0
    first = results[0][1]
    shape = "chain" if not ns.tree else f"tree draft ({ns.tree} candidates per position)"
    print(f"{n}-stage pipeline, {shape}, block lengths {first.block_lengths}, {first.samples} samples x "
          f"{first.new_tokens} tokens, seed {ns.seed}, every rule on the same tables and seeds")
    bounds = [f"{k + 1}->{k + 2}" for k in range(n - 1)]
    print("| policy | " + " | ".join(f"acceptance {b}" for b in bounds) + " | tokens per target forward | TV | "
          "chi-square p |")
    print("|" + "---|" * (len(bounds) + 4))
    for rule, res, _ in results:
        print(f"| {md_escape(rule)} | " + " | ".join(f"{a:.4f}" for a in res.acceptance)
              + f" | {res.tokens_per_target_forward:.3f} | {res.tv:.4f} | {res.p_value:.3g} |")
    return 0
