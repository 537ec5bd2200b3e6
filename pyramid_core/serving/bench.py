"""Bench inside vLLM: plain decoding, vLLM's ngram proposer, a pyramid lower chain as its
proposer (each step's block length from the planner, or fixed) and (``--head DIR``) an EAGLE-3
head exported by ``pyramid distill export`` on vLLM's own EAGLE-3 path, on the same prompts at
several concurrencies, greedy; tokens/s, vLLM's own accept length, and whether every request's
output equals vLLM plain's. With ``--head`` it also decodes the same prompts with the same head
in pyramid (``feature:path=DIR`` -> the target) and compares the tokens per target forward of
the two. Run it with the Python of the environment that has vLLM (``nox -s vllm`` does)::

    python -m pyramid_core.serving.bench --out out/vllm-bench --concurrency 1 8 32 [--head DIR]

One engine per method (each loads once); at concurrency c the prompts go in batches of c
requests, after one untimed batch of c other requests (``warm_prompts``) that warms that batch
shape up (vLLM compiles and packs kernels for the shapes a step meets first; the planner learns
its costs): each method is timed as a server in its steady state. ``--repeat N``: N passes over
the prompts, tokens/s their median (greedy outputs must not change between passes);
``--interleave``: all engines loaded at once and their passes alternated, so that a shared
machine's drift falls on every method alike. Guarded by ``__main__``: vLLM's worker processes
re-import the module."""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
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
    """vLLM's speculative-decoding counters (drafts, draft tokens, accepted tokens) of ``llm``'s
    engine. Every engine of a process registers its counters in one Prometheus registry, and a
    new engine unregisters those before it, so ``get_metrics`` sees the newest engine only: the
    counters are read from the engine's own stat logger where it has one (vLLM 0.32's layout), and
    from ``get_metrics`` otherwise (one engine per process)."""
    own = _logger_counters(llm)
    if own is not None:
        return own
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_num_") and getattr(m, "value", None) is not None:
            name = m.name.removeprefix("vllm:spec_decode_")
            out[name] = out.get(name, 0.0) + float(m.value)
    return out


def _logger_counters(llm: Any) -> dict[str, float] | None:
    """The spec-decoding counters held by ``llm``'s own Prometheus stat logger (summed over its
    engine indices; none for an engine without speculative decoding), or ``None`` where vLLM keeps
    them elsewhere."""
    manager = getattr(getattr(llm, "llm_engine", None), "logger_manager", None)
    for logger in getattr(manager, "stat_loggers", ()):
        prom = getattr(logger, "spec_decoding_prom", None)
        if prom is None:
            continue
        if not getattr(prom, "spec_decoding_enabled", False):
            return {}  # an engine without speculative decoding counts nothing
        try:
            return {name: sum(float(child._value.get()) for child in getattr(prom, f"counter_spec_decode_{name}").values())
                    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
        except (AttributeError, TypeError):
            return None
    return None


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
    calls = after["calls"] - before.get("calls", 0)
    return {"chosen": {k: n for k, n in chosen.items() if n}, "verdicts": verdicts, "alpha": after["alpha"],
            "ms_per_call": 1e3 * (after["seconds"] - before.get("seconds", 0.0)) / calls if calls else None,
            "step_s": after["step_s"], "draft_s_per_token": after["draft_s_per_token"], "timing": timing,
            "chosen_lookup": {k: n for k, n in looked.items() if n}, "lookup_alpha": after.get("lookup_alpha"),
            "lookup_first_token_by_support": after.get("lookup_first_token_by_support")}


@attrs.define(eq=False)
class Engine:
    """One method's vLLM engine and what its timed passes measured, concurrency by concurrency:
    ``warm`` (the untimed batch of that shape, then the counters' starting point), ``timed_pass``
    (all prompts once, in batches of c), ``finish`` (the row of that concurrency)."""

    name: str
    llm: Any
    texts: list[str]
    params: Any
    load_s: float
    stats: Path | None = None
    rows: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    start: dict[str, Any] = attrs.field(factory=dict)  # the proposer's stats before the timed passes
    passes: list[tuple[float, list[list[int]]]] = attrs.field(factory=list)
    # vLLM's counters over the timed passes alone, read around each pass: they are one registry
    # per process, which the engines of --interleave share (only one runs at a time)
    counted: dict[str, float] = attrs.field(factory=dict)

    @classmethod
    def load(cls, name: str, model: str, dtype: str, prompts: list[str], tokens: int, max_seqs: int,
             speculative: dict[str, Any] | None, memory: float, stats: Path | None = None) -> Engine:
        from vllm import LLM, SamplingParams  # type: ignore[import-not-found]

        t0 = time.perf_counter()
        llm = LLM(model=model, dtype=dtype, gpu_memory_utilization=memory, max_model_len=2048, seed=0,
                  disable_log_stats=False, max_num_seqs=max_seqs, speculative_config=speculative)
        texts = [_chat(llm, p) for p in prompts]
        return cls(name, llm, texts, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=False),
                   time.perf_counter() - t0, stats)

    def warm(self, c: int) -> None:
        self.llm.generate([_chat(self.llm, p) for p in warm_prompts(c)], self.params, use_tqdm=False)
        self.start, self.passes, self.counted = _proposer_stats(self.stats), [], {}

    def timed_pass(self, c: int) -> None:
        outputs: list[list[int]] = []
        before = _counters(self.llm)
        t0 = time.perf_counter()
        for i in range(0, len(self.texts), c):
            outputs += [list(o.outputs[0].token_ids)
                        for o in self.llm.generate(self.texts[i: i + c], self.params, use_tqdm=False)]
        self.passes.append((time.perf_counter() - t0, outputs))
        for k, v in _counters(self.llm).items():
            self.counted[k] = self.counted.get(k, 0.0) + v - before.get(k, 0.0)

    def finish(self, c: int) -> None:
        outputs = self.passes[0][1]
        if any(o != outputs for _, o in self.passes):
            raise RuntimeError(f"{self.name}: greedy outputs changed between passes at concurrency {c}")
        seconds = statistics.median(t for t, _ in self.passes)
        drafts = self.counted.get("num_drafts", 0.0)
        tokens = sum(len(o) for o in outputs)
        self.rows[str(c)] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                             "tokens_per_s_passes": [tokens / t for t, _ in self.passes],
                             "accept_length": 1 + self.counted.get("num_accepted_tokens", 0.0) / drafts if drafts else None,
                             "planner": _planned(self.start, _proposer_stats(self.stats)), "outputs": outputs}

    def result(self) -> dict[str, Any]:
        return {"method": self.name, "load_s": self.load_s, "by_concurrency": self.rows}

    def close(self) -> None:
        del self.llm
        gc.collect()


def _chat(llm: Any, prompt: str) -> str:
    return str(llm.get_tokenizer().apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                       add_generation_prompt=True))


def run_methods(loads: list[Callable[[float], Engine]], concurrency: list[int], repeat: int, memory: float,
                interleave: bool) -> list[dict[str, Any]]:
    """Each method timed at each concurrency over ``repeat`` passes. One engine at a time (each
    with ``memory`` of the machine), or with ``interleave`` all loaded at once (sharing it) and
    their passes alternated -- A B C, then C B A -- so that a shared machine's drift between
    methods falls on all of them alike."""
    out = []
    for group in [loads] if interleave else [[load] for load in loads]:
        engines = [load(memory / len(group)) for load in group]
        for c in concurrency:
            for engine in engines:
                engine.warm(c)
            for rep in range(repeat):
                for engine in engines if rep % 2 == 0 else engines[::-1]:
                    engine.timed_pass(c)
            for engine in engines:
                engine.finish(c)
        out += [engine.result() for engine in engines]
        for engine in engines:
            engine.close()
    return out


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
    p.add_argument("--lookup", help="a model-free proposer the pyramid proposer asks first for every row, e.g. "
                                    "ngram (the planner gives each row a prefix of its block, a drafted block or "
                                    "nothing; default none)")
    p.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--head", help="a speculators EAGLE-3 folder (`pyramid distill export`): adds the method head")
    p.add_argument("--methods", nargs="+", default=None,
                   help="of plain, ngram, pyramid (the planner chooses each step's block length), pyramid-fixed "
                        "(always k), head (default: plain ngram pyramid, and head with --head)")
    p.add_argument("--repeat", type=int, default=1,
                   help="timed passes over the prompts per concurrency; tokens/s is their median (default 1)")
    p.add_argument("--interleave", action="store_true",
                   help="load every method's engine at once (sharing --memory-fraction) and alternate their passes")
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
    ns.out.mkdir(parents=True, exist_ok=True)

    def loader(m: str) -> Callable[[float], Engine]:
        def load(memory: float) -> Engine:  # the chain reaches vLLM's worker through the environment,
            os.environ[CHAIN_ENV] = attrs.evolve(chain, adaptive=m != "pyramid-fixed").to_json()  # its stats
            stats = ns.out / f"proposer-{m}.json"  # come back in a file
            stats.unlink(missing_ok=True)
            os.environ[STATS_ENV] = str(stats)
            return Engine.load(m, ns.model, ns.dtype, prompts, ns.tokens, max(ns.concurrency), configs[m], memory,
                               stats if m.startswith("pyramid") else None)
        return load

    results = run_methods([loader(m) for m in methods], ns.concurrency, ns.repeat, ns.memory_fraction,
                          ns.interleave)
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
        lines += ["", "| method | concurrency | steps by drafted block length (k: steps) | lookup blocks by "
                      "length (k: blocks) | the planner's α | accepted / offered (read from vLLM's steps) | "
                      "ms in the proposer per step | ms per lane draft | ms per vLLM step with drafts | without |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]

        def ms(pair: list[float]) -> str:
            return f"{1e3 * pair[1] / pair[0]:.1f}" if pair[0] else "—"

        for name, c, plan in planned:
            def counts(by_k: dict[str, int]) -> str:
                return ", ".join(f"{k}: {n}" for k, n in sorted(by_k.items(), key=lambda kv: int(kv[0]))) or "—"

            v, t = plan["verdicts"], plan["timing"]
            read = f"{v['accepted'] / v['offered']:.3f}" if v["offered"] else "—"
            ms_call = "—" if plan["ms_per_call"] is None else f"{plan['ms_per_call']:.1f}"
            lines.append(f"| {name} | {c} | {counts(plan['chosen'])} | {counts(plan['chosen_lookup'])} | "
                         f"{plan['alpha']:.3f} | {read} | {ms_call} | {ms(t['lanes'])} | "
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
