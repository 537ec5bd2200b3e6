"""CUDA check: what pyramid's stages and pipelines do on a GPU, in one run of a few minutes.

    python benchmarks/cuda_check.py --out DIR [--device cuda] [--budget-s 420]

Sections (each writes its results to DIR/cuda_check.json as soon as it ends, and a section that
fails is reported and skipped, so a run always leaves what it measured):

1. exactness on the device: 3-stage chains of explicit tables on the GPU, ``exact`` and
   ``block`` at both boundaries; chi-square against the target table (4,000 samples each,
   p > 1e-3 to pass).
2. T(M): ms per forward feeding M = 1, 2, 4, 8, 16 tokens after a 64-token context, per stage
   of the SmolLM2 family (after ``pyramid setup``) and per mode (``eager``, ``graphs``), timed
   with CUDA events; the largest |logit| difference graphs vs eager (float32); graphs captured.
3. pipelines in both modes (bfloat16 and float32): target alone, ngram -> target,
   draft -> target, tree draft -> target, draft -> qualifier -> target, feature -> target;
   greedy tokens identical to the target alone in the same mode, and to eager HF ``generate``;
   tokens/s next to HF ``generate`` (eager) and HF ``generate`` with its static cache and
   ``torch.compile`` (one prompt, compiled untimed first); host synchronisations per round.

With ``--device cpu`` it runs every section on the CPU (``static`` instead of ``graphs``): a dry
run of this script before it goes to a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

PROMPTS = [
    "Explain in three sentences why the sky is blue.",
    "Write a short Python function that reverses a string, with a docstring.",
    "Translate into French: The library opens at nine and closes at five.",
]


def exactness(device: str, n: int) -> dict[str, Any]:
    from pyramid_core.build import build_pipeline
    from pyramid_core.rng import Rng
    from pyramid_core.testing import TableModel
    from pyramid_core.testing.exactness import chi_square_p_value

    tables = [[0.5, 0.3, 0.15, 0.05], [0.2, 0.45, 0.25, 0.1], [0.1, 0.3, 0.4, 0.2]]
    out: dict[str, Any] = {}
    for policy in ("exact", "block"):
        stages = [TableModel(t, name=f"s{i}", device=device) for i, t in enumerate(tables)]
        pipe = build_pipeline(stages, [policy, policy], [2, 3])
        counts = [0] * 4
        rng = Rng(0)
        prompt = torch.zeros(1, dtype=torch.long, device=device)
        t0 = time.perf_counter()
        for _ in range(n):
            proposer, _ = pipe.build()
            counts[int(proposer.propose(prompt, 1, rng).tokens[0])] += 1
        p = chi_square_p_value(counts, tables[-1])
        out[policy] = {"samples": n, "counts": counts, "p_value": p, "ok": p > 1e-3,
                       "seconds": round(time.perf_counter() - t0, 1)}
    return out


def family_stage(which: str, device: str, dtype: str, mode: str) -> Any:
    from pyramid_core.build import make_stage
    from pyramid_core.options import ExecutionMode

    spec = f"smollm2:dtype={dtype}" if which == "target" else f"smollm2:stage={which},dtype={dtype}"
    compile = ExecutionMode.EAGER if which == "feature" else ExecutionMode.parse(mode)
    return make_stage(spec, device=device, compile=compile)


def timed_ms(fn: Any, device: str, repeats: int) -> float:
    """Median ms of ``fn()`` (CUDA events on a GPU, the host clock elsewhere)."""
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    return times[len(times) // 2]


def t_of_m(device: str, graph_mode: str, repeats: int) -> dict[str, Any]:
    from pyramid_core.types import Block

    out: dict[str, Any] = {}
    context = (torch.arange(64) * 37 % 49152).long()
    for dtype in ("bfloat16", "float32"):
        for which in ("target", "draft", "qualifier"):
            row: dict[str, Any] = {}
            logits: dict[str, Tensor] = {}
            for mode in ("eager", graph_mode):
                stage = family_stage(which, device, dtype, mode)
                ms = {}
                for m in (1, 2, 4, 8, 16):
                    block = None if m == 1 else Block(torch.arange(1, m), torch.zeros(m - 1, 0))
                    ctx = context if m == 1 else context
                    stage.reset()
                    stage.score(ctx[:-1])  # the context is cached; each timed call feeds m tokens

                    def once(stage: Any = stage, ctx: Any = ctx, block: Any = block) -> None:
                        stage.score(ctx, block)
                        stage._cache.truncate(len(ctx) - 1)  # the next call feeds the same m tokens

                    for _ in range(3):
                        once()
                    ms[m] = round(timed_ms(once, device, repeats), 3)
                logits[mode] = stage.score(context, Block(torch.arange(1, 8), torch.zeros(7, 0))).float().cpu()
                static = getattr(stage, "_static", None)
                row[mode] = {"ms": ms, "T16/T1": round(ms[16] / ms[1], 3),
                             "captures": getattr(static, "captures", None)}
                del stage
            row["max_abs_logit_diff"] = float((logits["eager"] - logits[graph_mode]).abs().max())
            out[f"{which} {dtype}"] = row
            print(which, dtype, json.dumps(row), flush=True)
    return out


def hf_generate_tps(model: Any, ids: list[int], n: int, static_compile: bool) -> tuple[list[int], float]:
    x = torch.tensor([ids], device=next(model.parameters()).device)
    import copy

    config = copy.deepcopy(model.generation_config)  # no end-of-sequence stop: n tokens, like the pipelines
    config.eos_token_id = None
    config.pad_token_id = 0
    kwargs: dict[str, Any] = {"do_sample": False, "max_new_tokens": n, "attention_mask": torch.ones_like(x),
                              "generation_config": config}
    runner = model
    if static_compile:  # transformers compiles the decoding step itself with a static cache on CUDA
        kwargs["cache_implementation"] = "static"
    with torch.inference_mode():
        runner.generate(x, **kwargs)  # untimed: warms up (and compiles)
        runner.generate(x, **kwargs)
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = runner.generate(x, **kwargs)
        if x.is_cuda:
            torch.cuda.synchronize()
    return out[0, len(ids):].tolist(), n / (time.perf_counter() - t0)


def count_syncs(fn: Any) -> int:
    """Host synchronisations ``fn`` makes (torch's sync debug mode, CUDA only)."""
    if not torch.cuda.is_available():
        return -1
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def pipelines(device: str, graph_mode: str, dtype: str, new_tokens: int, hf_compile: bool,
              modes: tuple[str, ...] = ("eager", "graphs"), only: tuple[str, ...] = ()) -> dict[str, Any]:
    from pyramid_core import SamplingConfig, build_pipeline
    from pyramid_core.lab.prompts import encode_prompt

    greedy = SamplingConfig.greedy()
    out: dict[str, Any] = {}
    for mode in [graph_mode if m == "graphs" else m for m in modes]:
        target = family_stage("target", device, dtype, mode)
        draft = family_stage("draft", device, dtype, mode)
        qualifier = family_stage("qualifier", device, dtype, mode)
        feature = family_stage("feature", device, dtype, mode)
        prompts = [encode_prompt(target.tokenizer, p, True) for p in PROMPTS]
        configs: dict[str, tuple[list[Any], list[int], str | None]] = {
            "target (N=1)": ([target], [], None),
            "ngram -> target": (["ngram", target], [3], None),
            "draft -> target": ([draft, target], [3], None),
            "tree draft -> target": ([draft, target], [3], "tree:budget=8,branching=4"),
            "draft -> qualifier -> target": ([draft, qualifier, target], [1, 3], None),
            "feature -> target": ([feature, target], [2], None),
        }
        ref: list[list[int]] = []
        rows: dict[str, Any] = {}
        for label, (stages, lengths, tree) in configs.items():
            if only and not label.startswith("target") and label not in only:
                continue
            pipe = build_pipeline(stages, ["exact"] * len(lengths), lengths, tree=tree, sampling=greedy, stop_ids=[])
            pipe.generate(prompts[0], 8)  # warm-up (captures the buckets it uses)
            tokens, wall, new, fwd = [], 0.0, 0, 0
            for p in prompts:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                gen = pipe.generate(p, new_tokens)
                tokens.append(gen.token_list)
                wall += gen.metrics.wall_s
                new += gen.metrics.new_tokens
                fwd += gen.metrics.target_forwards
            if label.startswith("target"):
                ref = tokens
            syncs = count_syncs(lambda pipe=pipe, first=prompts[0]: pipe.generate(first, 16))
            gen16 = pipe.generate(prompts[0], 16)
            rows[label] = {"tokens_per_s": round(new / wall, 1), "tokens_per_target_forward": round(new / fwd, 2),
                           "identical_to_target_alone": tokens == ref,
                           "syncs_per_round": round(syncs / max(1, gen16.metrics.target_forwards), 1)}
            print(mode, dtype, label, json.dumps(rows[label]), flush=True)
        hf_tokens, hf_tps = [], []
        for p in prompts:
            toks, tps = hf_generate_tps(target.model, p, new_tokens, False)
            hf_tokens.append(toks)
            hf_tps.append(tps)
        rows["HF generate (eager)"] = {"tokens_per_s": round(sum(hf_tps) / len(hf_tps), 1)}
        for label in rows:
            if label.startswith("HF"):
                continue
            rows[label]["identical_to_hf_generate"] = rows[label]["identical_to_target_alone"] and ref == hf_tokens
        out[mode] = rows
        del target, draft, qualifier, feature
        torch.cuda.empty_cache() if device.startswith("cuda") else None
    if hf_compile:
        try:
            from pyramid_core.backends.hf.loading import load_model
            from pyramid_core.backends.hf.smollm2 import smollm2_dir

            model = load_model(smollm2_dir(), device=device, dtype=dtype)
            tokenizer = family_stage("target", "cpu", "float32", "eager").tokenizer
            tps = [hf_generate_tps(model, encode_prompt(tokenizer, p, True), new_tokens, True)[1] for p in PROMPTS]
            out["HF generate (static cache + torch.compile)"] = {"tokens_per_s": round(sum(tps) / len(tps), 1)}
        except Exception as exc:  # reported, not fatal
            out["HF generate (static cache + torch.compile)"] = {"error": repr(exc)[:300]}
    return out


Tensor = torch.Tensor


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-hf-compile", action="store_true")
    ap.add_argument("--sections", default="exactness,t_of_m,pipelines bfloat16,pipelines float32",
                    help="comma-separated sections to run")
    ap.add_argument("--modes", default="eager,graphs", help="pipeline modes (comma-separated)")
    ap.add_argument("--rows", default="", help="pipeline rows to run besides the target alone (default all)")
    ns = ap.parse_args()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = ns.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    graph_mode = "graphs" if dev.startswith("cuda") else "static"
    import transformers

    report: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu",
                              "torch": torch.__version__, "transformers": transformers.__version__, "sections": {}}
    modes = tuple(m for m in ns.modes.split(",") if m)
    only = tuple(r for r in ns.rows.split(",") if r)
    sections = [
        ("exactness", lambda: exactness(dev, ns.samples)),
        ("t_of_m", lambda: t_of_m(dev, graph_mode, ns.repeats)),
        ("pipelines bfloat16", lambda: pipelines(dev, graph_mode, "bfloat16", ns.new_tokens, not ns.no_hf_compile,
                                                 modes, only)),
        ("pipelines float32", lambda: pipelines(dev, graph_mode, "float32", ns.new_tokens, False, modes, only)),
    ]
    sections = [s for s in sections if s[0] in ns.sections.split(",")]
    ok = True
    for name, fn in sections:
        t0 = time.perf_counter()
        try:
            report["sections"][name] = {"result": fn()}
        except Exception:
            ok = False
            report["sections"][name] = {"error": traceback.format_exc()[-2000:]}
            print(report["sections"][name]["error"], file=sys.stderr, flush=True)
        report["sections"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"== {name}: {report['sections'][name]['seconds']} s", flush=True)
        (out / "cuda_check.json").write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
