"""CUDA check: pipelines on a GPU give the same greedy tokens as HF `generate`, sample exactly,
and how fast they are. Needs a CUDA device; uses random weights (no model hub, no setup).

    python benchmarks/cuda_check.py [--out results.json]

1. Exactness on the GPU: a 3-stage exact chain of TableModels on `cuda` (policies, RNG and
   residual sampling all on the device), chi-square against the target table.
2. Greedy identity and speed: a random Llama with SmolLM2-135M's shape (30 layers, hidden 576,
   vocab 49152) as the target, its first 8 layers and its perturbed copy as drafts; pipelines
   (target alone, ngram -> target, perturbed -> target, truncated -> perturbed -> target) in
   float32 (asserted token-identical to HF greedy) and bfloat16 (agreement reported; bf16
   batched and incremental forwards may legitimately round differently).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch


def smollm2_shaped(seed: int, dtype: torch.dtype, device: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def perturb(model: Any, scale: float, seed: int) -> Any:
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * scale * p.std())
    return other


def exactness_on_device(device: str) -> dict[str, Any]:
    from pyramid_core.pipeline import Pipeline
    from pyramid_core.rng import Rng
    from pyramid_core.testing import TableModel
    from pyramid_core.testing.exactness import chi_square_p_value
    from pyramid_plugins.exact import ExactPolicy

    tables = [[0.5, 0.3, 0.15, 0.05], [0.2, 0.45, 0.25, 0.1], [0.1, 0.3, 0.4, 0.2]]
    stages = [TableModel(t, name=f"s{i}", device=device) for i, t in enumerate(tables)]
    pipe = Pipeline(stages, [ExactPolicy(), ExactPolicy()], [3, 2])
    counts = [0] * 4
    rng = Rng(0)
    n = 4000
    t0 = time.perf_counter()
    prompt = torch.zeros(1, dtype=torch.long, device=device)
    for _ in range(n):
        proposer, _ = pipe.build()
        counts[int(proposer.propose(prompt, 1, rng).tokens[0])] += 1
    p = chi_square_p_value(counts, tables[-1])
    return {"samples": n, "counts": counts, "p_value": p, "seconds": time.perf_counter() - t0, "ok": p > 1e-3}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_greedy(model: Any, ids: list[int], n: int) -> tuple[list[int], float]:
    x = torch.tensor([ids], device=next(model.parameters()).device)
    with torch.inference_mode():
        model.generate(x, max_new_tokens=4, do_sample=False)
        _sync()
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=n, do_sample=False)
        _sync()
    return out[0, len(ids):].tolist(), time.perf_counter() - t0


def speed(dtype: torch.dtype, device: str, n_new: int) -> dict[str, Any]:
    from pyramid_core import SamplingConfig, build_pipeline
    from pyramid_core.backends.hf import HFStage

    target_model = smollm2_shaped(0, dtype, device)
    near_model = perturb(target_model, 0.02, 1)
    target = HFStage(target_model, name="target", vocab_size=49152)
    near = HFStage(near_model, name="near", vocab_size=49152)
    trunc = HFStage(near_model, name="near[:8]", vocab_size=49152, num_layers=8)
    prompt = (torch.arange(40) * 37 % 49152).tolist() * 2  # repetitive: gives ngram something to find
    ref, hf_s = hf_greedy(target_model, prompt, n_new)
    rows: dict[str, Any] = {"hf_generate": {"tokens_per_s": len(ref) / hf_s}}
    configs = {
        "target alone": ([target], []),
        "ngram -> target": (["ngram", target], [4]),
        "near -> target": ([near, target], [4]),
        "near[:8] -> near -> target": ([trunc, near, target], [3, 6]),
    }
    for label, (stages, lengths) in configs.items():
        pipe = build_pipeline(stages, ["exact"] * len(lengths), lengths, sampling=SamplingConfig.greedy(), stop_ids=[])
        pipe.generate(prompt, 4)  # warm-up
        gen = pipe.generate(prompt, n_new)
        m = gen.metrics
        same = gen.token_list == ref
        agree = sum(a == b for a, b in zip(gen.token_list, ref)) / len(ref)
        rows[label] = {
            "identical": same, "agreement": agree, "tokens_per_s": m.tokens_per_s,
            "speedup_vs_hf": m.tokens_per_s * hf_s / len(ref),
            "tokens_per_target_forward": m.tokens_per_target_forward,
            "overhead_fraction": m.overhead_s / m.wall_s,
            "acceptance": [b.acceptance_rate for b in m.boundaries],
        }
    # sampling mode runs on the device too
    pipe = build_pipeline([near, target], ["exact"], [4], sampling=SamplingConfig(temperature=0.8, top_p=0.9), stop_ids=[])
    gen = pipe.generate(prompt, 32, seed=0)
    rows["sampling near -> target"] = {"tokens": gen.metrics.new_tokens, "reproducible": gen.token_list == pipe.generate(prompt, 32, seed=0).token_list}
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--device", default="cuda", help="cpu only for a dry run of this script")
    ns = ap.parse_args()
    dev = ns.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__
    report["exactness"] = exactness_on_device(dev)
    print(json.dumps(report, indent=1), flush=True)
    report["float32"] = speed(torch.float32, dev, ns.new_tokens)
    print(json.dumps(report["float32"], indent=1), flush=True)
    report["bfloat16"] = speed(torch.bfloat16, dev, ns.new_tokens)
    print(json.dumps(report["bfloat16"], indent=1), flush=True)
    if ns.out:
        with open(ns.out, "w") as fh:
            json.dump(report, fh, indent=1)
    ok = report["exactness"]["ok"] and all(
        v.get("identical", True) for k, v in report["float32"].items() if isinstance(v, dict)
    )
    print("CUDA CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
