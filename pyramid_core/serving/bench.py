"""Bench inside vLLM: plain decoding, vLLM's ngram proposer, a pyramid lower chain as its
proposer (each step's block length from the planner, or fixed) and (``--head DIR``) an EAGLE-3
head exported by ``pyramid distill export`` on vLLM's own EAGLE-3 path, on the same prompts at
several concurrencies, greedy; tokens/s, vLLM's own accept length, and whether every request's
output equals vLLM plain's. With ``--head`` it also decodes the same prompts with the same head
in pyramid (``feature:path=DIR`` -> the target) and compares the tokens per target forward of
the two. Run it with the Python of the environment that has vLLM (``nox -s vllm`` does)::

    python -m pyramid_core.serving.bench --out out/vllm-bench --concurrency 1 8 32 [--head DIR]

One engine per method (each loads once); at concurrency c the prompts go in batches of c
requests, after one untimed batch of c other requests (``WARM``) that warms that batch shape up
(vLLM compiles and packs kernels for the shapes a step meets first; the planner learns its
costs): each method is timed as a server in its steady state. Guarded by ``__main__``: vLLM's worker processes re-import the module."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import attrs

from pyramid_core.serving.proposer import CHAIN_ENV, PROPOSER_CLASS, STATS_ENV, LowerChain

__all__ = ["main"]

PROMPTS = [
    "List three uses of a paperclip.",
    "Write a Python function that reverses a string.",
    "What is the capital of France? Explain briefly.",
    "Summarise the water cycle in two sentences.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Give a step-by-step recipe for scrambled eggs.",
    "Explain what a hash table is to a beginner.",
    "Write a haiku about autumn rain.",
]


def warm_prompts(n: int) -> list[str]:
    """``n`` requests unlike the timed ones (no shared prefix beyond the chat template), for the
    untimed warm-up batch of each concurrency."""
    return [f"Count from {10 * i + 3} to {10 * i + 30}, one number per line." for i in range(n)]


def _counters(llm: Any) -> dict[str, float]:
    """vLLM's speculative-decoding counters (drafts, draft tokens, accepted tokens)."""
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_num_") and getattr(m, "value", None) is not None:
            out[m.name.removeprefix("vllm:spec_decode_")] = float(m.value)
    return out


def _proposer_stats(path: Path | None) -> dict[str, Any]:
    """What the pyramid proposer in vLLM's worker last wrote (``STATS_ENV``), or {}."""
    try:
        return dict(json.loads(path.read_text())) if path is not None else {}
    except (OSError, ValueError):
        return {}


def _planned(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any] | None:
    """The planner's choices (steps by block length) and the verdicts it read between two stats."""
    if "chosen" not in after:
        return None
    def since(field: str) -> dict[str, Any]:  # counts, or [count, seconds] pairs, minus those before
        was = before.get(field, {})
        return {k: [a - b for a, b in zip(v, was.get(k, [0, 0.0]), strict=True)] if isinstance(v, list)
                else v - was.get(k, 0) for k, v in after[field].items()}

    chosen, verdicts, timing = since("chosen"), since("verdicts"), since("timing")
    looked = since("chosen_lookup") if "chosen_lookup" in after else {}  # with a lookup: its own block lengths
    return {"chosen": {k: n for k, n in chosen.items() if n}, "verdicts": verdicts, "alpha": after["alpha"],
            "step_s": after["step_s"], "draft_s_per_token": after["draft_s_per_token"], "timing": timing,
            "chosen_lookup": {k: n for k, n in looked.items() if n}, "lookup_alpha": after.get("lookup_alpha")}


def run_method(name: str, model: str, dtype: str, prompts: list[str], tokens: int, concurrency: list[int],
               speculative: dict[str, Any] | None, memory: float, stats: Path | None = None) -> dict[str, Any]:
    from vllm import LLM, SamplingParams  # type: ignore[import-not-found]

    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, gpu_memory_utilization=memory, max_model_len=2048, seed=0,
              disable_log_stats=False, max_num_seqs=max(concurrency), speculative_config=speculative)
    load = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=False)
    rows = {}
    for c in concurrency:
        warm = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in warm_prompts(c)]
        llm.generate(warm, params, use_tqdm=False)  # this batch shape, untimed
        before, mine = _counters(llm), _proposer_stats(stats)
        outputs: list[list[int]] = []
        t0 = time.perf_counter()
        for i in range(0, len(texts), c):
            outputs += [list(o.outputs[0].token_ids) for o in llm.generate(texts[i: i + c], params, use_tqdm=False)]
        seconds = time.perf_counter() - t0
        after = _counters(llm)
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        drafts = delta.get("num_drafts", 0.0)
        rows[str(c)] = {"seconds": seconds, "tokens": sum(len(o) for o in outputs),
                        "tokens_per_s": sum(len(o) for o in outputs) / seconds,
                        "accept_length": 1 + delta.get("num_accepted_tokens", 0.0) / drafts if drafts else None,
                        "planner": _planned(mine, _proposer_stats(stats)), "outputs": outputs}
    del llm
    gc.collect()
    return {"method": name, "load_s": load, "by_concurrency": rows}


def pyramid_head_run(head: str, model: str, dtype: str, token_prompts: list[list[int]], tokens: int,
                     k: int) -> dict[str, Any]:
    """The same head in pyramid, on the same prompt tokens, greedy: its tokens per target forward
    (1 + accepted / verifications: vLLM's accept length, counted the same way) and its outputs."""
    from pyramid_core import build_pipeline
    from pyramid_core.pipeline import Metrics
    from pyramid_core.types import SamplingConfig

    pipe = build_pipeline([f"feature:path={head}", f"hf:path={model}"], ["exact"], [k],
                          sampling=SamplingConfig(temperature=0.0), dtype=dtype)
    runs = [pipe.generate(ids, tokens, seed=0) for ids in token_prompts]
    pooled = Metrics.pool([r.metrics for r in runs])
    top = pooled.boundaries[-1]
    return {"accept_length": 1 + top.accepted / top.rounds if top.rounds else None,
            "verifications": top.rounds, "accepted": top.accepted, "tokens_per_s": pooled.new_tokens / pooled.wall_s,
            "outputs": [r.token_list for r in runs]}  # the new tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyramid_core.serving.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="the target's directory (default: SmolLM2-135M of `pyramid setup`)")
    p.add_argument("--stage", action="append", default=None,
                   help="the pyramid lower chain's stages, smallest first (default: smollm2:stage=draft)")
    p.add_argument("--policy", action="append", default=[], help="policies between the lower stages")
    p.add_argument("--length", action="append", type=int, default=[], help="block lengths between the lower stages")
    p.add_argument("--lookup", help="a model-free proposer the pyramid lanes ask first, e.g. ngram (the chain "
                                    "drafts only where it proposes nothing; default none)")
    p.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--head", help="a speculators EAGLE-3 folder (`pyramid distill export`): adds the method head")
    p.add_argument("--methods", nargs="+", default=None,
                   help="of plain, ngram, pyramid (the planner chooses each step's block length), pyramid-fixed "
                        "(always k), head (default: plain ngram pyramid, and head with --head)")
    p.add_argument("--memory-fraction", type=float, default=0.3)
    p.add_argument("--out", type=Path, default=Path("out/vllm-bench"))
    ns = p.parse_args(argv)
    if ns.model is None:
        from pyramid_core.backends.hf.files import smollm2_dir

        ns.model = str(smollm2_dir())
    stages = ns.stage or ["smollm2:stage=draft"]
    chain = LowerChain(tuple(stages), tuple(ns.policy), tuple(ns.length), "cpu", ns.dtype, lookup=ns.lookup)
    prompts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" (variant {i // len(PROMPTS)})")
               for i in range(ns.prompts)]
    k = ns.num_speculative_tokens
    configs: dict[str, dict[str, Any] | None] = {
        "plain": None,
        "ngram": {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2},
        "pyramid": {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": k},
        "pyramid-fixed": {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": k},
        "head": {"method": "eagle3", "model": ns.head, "num_speculative_tokens": k},
    }
    methods = ns.methods or ["plain", "ngram", "pyramid"] + (["head"] if ns.head else [])
    if "head" in methods and not ns.head:
        p.error("method head needs --head DIR (a folder written by `pyramid distill export`)")
    if unknown := sorted(set(methods) - set(configs)):
        p.error(f"unknown methods {unknown}; valid: {', '.join(configs)}")
    in_pyramid = None
    if ns.head:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(ns.model)
        token_prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                                      add_generation_prompt=True, return_dict=False))
                         for q in prompts]
        in_pyramid = pyramid_head_run(ns.head, ns.model, ns.dtype, token_prompts, ns.tokens, k)
    results = []
    ns.out.mkdir(parents=True, exist_ok=True)
    for m in methods:  # the chain reaches vLLM's worker through the environment, its stats come back in a file
        os.environ[CHAIN_ENV] = attrs.evolve(chain, adaptive=m != "pyramid-fixed").to_json()
        stats = ns.out / f"proposer-{m}.json"
        stats.unlink(missing_ok=True)
        os.environ[STATS_ENV] = str(stats)
        results.append(run_method(m, ns.model, ns.dtype, prompts, ns.tokens, ns.concurrency, configs[m],
                                  ns.memory_fraction, stats if m.startswith("pyramid") else None))
    plain = next((r for r in results if r["method"] == "plain"), None)
    lines = ["| method | concurrency | tokens/s | × plain | accept length | identical to plain |",
             "|---|---:|---:|---:|---:|---|"]
    for r in results:
        for c, row in r["by_concurrency"].items():
            base = plain["by_concurrency"][c] if plain else None
            same = "—" if base is None else sum(a == b for a, b in zip(row["outputs"], base["outputs"], strict=True))
            ratio = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "—"
            acc = f"{row['accept_length']:.2f}" if row["accept_length"] else "—"
            n = len(row["outputs"])
            lines.append(f"| {r['method']} | {c} | {row['tokens_per_s']:.1f} | {ratio} | {acc} | "
                         f"{same if same == '—' else f'{same}/{n}'} |")
    planned = [(r["method"], c, row["planner"]) for r in results for c, row in r["by_concurrency"].items()
               if row.get("planner")]
    if planned:
        lines += ["", "| method | concurrency | steps by block length (k: steps) | the planner's α | "
                      "accepted / offered (read from vLLM's steps) | ms per lane draft | "
                      "ms per vLLM step with drafts | without |", "|---|---:|---|---:|---:|---:|---:|---:|"]

        def ms(pair: list[float]) -> str:
            return f"{1e3 * pair[1] / pair[0]:.1f}" if pair[0] else "—"

        for name, c, plan in planned:
            chosen = ", ".join(f"{k}: {n}" for k, n in sorted(plan["chosen"].items(), key=lambda kv: int(kv[0])))
            v, t = plan["verdicts"], plan["timing"]
            read = f"{v['accepted'] / v['offered']:.3f}" if v["offered"] else "—"
            lines.append(f"| {name} | {c} | {chosen} | {plan['alpha']:.3f} | {read} | {ms(t['lanes'])} | "
                         f"{ms(t['engine steps with drafts'])} | {ms(t['engine steps without'])} |")
    head_rows = next((r for r in results if r["method"] == "head"), None)
    if in_pyramid is not None and head_rows is not None:
        lines += ["", "| the exported head | tokens per target forward | vLLM / pyramid | identical to vLLM plain |",
                  "|---|---:|---:|---|"]
        mine = in_pyramid["accept_length"]
        plain_out = plain["by_concurrency"][str(ns.concurrency[0])]["outputs"] if plain else None
        same = "—" if plain_out is None else f"{sum(a == b for a, b in zip(in_pyramid['outputs'], plain_out, strict=True))}/{len(plain_out)}"
        lines.append(f"| in pyramid (feature:path=HEAD) | {mine:.3f} | 1.000 | {same} |")
        for c, row in head_rows["by_concurrency"].items():
            theirs = row["accept_length"]
            lines.append(f"| in vLLM, concurrency {c} | {theirs:.3f} | {theirs / mine:.3f} | "
                         f"{'—' if plain_out is None else 'see above'} |")
    table = "\n".join(lines)
    (ns.out / "vllm-bench.json").write_text(json.dumps({"chain": json.loads(chain.to_json()), "k": k,
                                                        "dtype": ns.dtype, "tokens": ns.tokens, "results": results,
                                                        "head_in_pyramid": in_pyramid},
                                                       indent=1) + "\n")
    (ns.out / "vllm-bench.md").write_text(table + "\n")
    sys.stdout.write(table + "\n")
    mismatched = [(r["method"], c) for r in results if plain for c, row in r["by_concurrency"].items()
                  if row["outputs"] != plain["by_concurrency"][c]["outputs"]]
    if mismatched:
        sys.stderr.write(f"greedy outputs differ from vLLM plain: {mismatched}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
