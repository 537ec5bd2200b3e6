"""``pyramid sweep``: a preset over a grid of thresholds and block lengths, with quality.

Quality is measured offline against the target itself: the mean per-token negative
log-likelihood of the generated text under the target (temperature 1, no truncation) and the
agreement with the target's own greedy output (exact-match of the whole continuation, and the
fraction of positions that agree).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from pyramid_core.build import build_pipeline, resolve_preset
from pyramid_core.pipeline import Pipeline
from pyramid_core.prompts import Prompt
from pyramid_core.protocols import Proposer, Stage
from pyramid_core.registry import parse_spec
from pyramid_core.types import Block, SamplingConfig

__all__ = ["SweepPoint", "with_tau", "target_nll", "encode_prompt", "run_sweep", "write_sweep"]


def with_tau(spec: str, tau: float) -> str:
    """The policy spec with ``tau`` replaced when it is a fuzzy policy, else unchanged."""
    name, params = parse_spec(spec)
    if "tau" not in params and name != "fuzzy":
        return spec
    params["tau"] = repr(float(tau))
    return name + ":" + ",".join(f"{k}={v}" for k, v in params.items())


def encode_prompt(tokenizer: Any, text: str, chat: bool = True) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return list(ids if isinstance(ids, list) else ids["input_ids"])
    return list(tokenizer(text)["input_ids"])


def target_nll(target: Stage, prompt: Sequence[int], tokens: Sequence[int]) -> float:
    """Mean negative log-likelihood (nats/token) of ``tokens`` after ``prompt`` under ``target``."""
    if not tokens:
        return float("nan")
    context = torch.tensor(list(prompt), dtype=torch.long, device=target.device)
    toks = torch.tensor(list(tokens), dtype=torch.long, device=target.device)
    logits = target.score(context, Block(toks, toks.new_zeros(len(toks), 0, dtype=torch.float32)))
    logp = torch.log_softmax(logits[:-1].float(), dim=-1).gather(-1, toks.unsqueeze(-1))
    return float(-logp.mean())


@attrs.frozen
class SweepPoint:
    label: str
    tau: float | None
    block_lengths: tuple[int, ...]
    policies: tuple[str, ...]
    tokens: int
    wall_s: float
    tokens_per_s: float
    tokens_per_target_forward: float
    acceptance: tuple[float, ...]
    nll: float
    exact_match: float
    token_match: float


def _agreement(out: list[int], ref: list[int]) -> float:
    n = max(len(out), len(ref))
    return sum(a == b for a, b in zip(out, ref)) / n if n else 1.0


def _measure(label: str, tau: float | None, policies: Sequence[str], pipe: Pipeline, encoded: list[list[int]], refs: list[list[int]],
             max_new_tokens: int, seed: int) -> SweepPoint:
    tokens = 0
    wall = 0.0
    forwards = 0
    proposed = [0] * (len(pipe.stages) - 1)
    accepted = [0] * (len(pipe.stages) - 1)
    nlls: list[float] = []
    exact = 0
    agree = 0.0
    for i, (ids, ref) in enumerate(zip(encoded, refs)):
        gen = pipe.generate(ids, max_new_tokens, seed=seed + i)
        m = gen.metrics
        tokens += m.new_tokens
        wall += m.wall_s
        forwards += m.target_forwards
        for k, b in enumerate(m.boundaries):
            proposed[k] += b.proposed
            accepted[k] += b.accepted
        out = gen.token_list
        nlls.append(target_nll(pipe.target, ids, out))
        exact += out == ref
        agree += _agreement(out, ref)
    finite = [x for x in nlls if math.isfinite(x)]
    return SweepPoint(
        label=label, tau=tau, block_lengths=tuple(pipe.block_lengths),
        policies=tuple(policies), tokens=tokens, wall_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else float("nan"),
        tokens_per_target_forward=tokens / forwards if forwards else float("nan"),
        acceptance=tuple(a / p if p else float("nan") for a, p in zip(accepted, proposed)),
        nll=sum(finite) / len(finite) if finite else float("nan"),
        exact_match=exact / len(encoded), token_match=agree / len(encoded),
    )


def run_sweep(
    stages: Sequence[str | Stage | Proposer],
    preset: str,
    taus: Sequence[float],
    prompts: Sequence[Prompt],
    *,
    length_grid: Sequence[Sequence[int]] | None = None,
    max_new_tokens: int = 32,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    chat: bool = True,
    progress: bool = True,
) -> list[SweepPoint]:
    """Measure the target alone, then ``preset`` at every (tau, block lengths) grid point."""
    from tqdm import tqdm

    sampling = sampling or SamplingConfig()
    base = build_pipeline(stages, sampling=sampling, preset=preset)  # loads each stage once
    loaded = list(base.stages)
    target = base.target
    tok = getattr(target, "tokenizer", None)
    if tok is None:
        raise ValueError("sweep needs a target stage with a tokenizer")
    encoded = [encode_prompt(tok, p.text, chat) for p in prompts]
    plan = resolve_preset(preset, len(loaded))
    grids = [tuple(g) for g in length_grid] if length_grid else [plan.block_lengths]
    greedy = Pipeline([target], sampling=SamplingConfig.greedy(), stop_ids=base.stop_ids)
    refs = [greedy.generate(ids, max_new_tokens).token_list for ids in encoded]
    alone = Pipeline([target], sampling=sampling, stop_ids=base.stop_ids)
    points = [_measure("target alone", None, (), alone, encoded, refs, max_new_tokens, seed)]
    jobs = [(tau, lengths) for lengths in grids for tau in taus]
    for tau, lengths in tqdm(jobs, desc=f"sweep {preset}", disable=not progress):
        policies = [with_tau(s, tau) for s in plan.policies]
        pipe = build_pipeline(loaded, policies, list(lengths), sampling=sampling, stop_ids=base.stop_ids)
        points.append(_measure(preset, tau, policies, pipe, encoded, refs, max_new_tokens, seed))
    return points


def write_sweep(points: Sequence[SweepPoint], out_dir: str | Path, *, title: str = "") -> list[Path]:
    """sweep.json, sweep.csv and (with matplotlib) sweep.png in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [attrs.asdict(p) for p in points]
    written = [out / "sweep.json", out / "sweep.csv"]
    written[0].write_text(json.dumps({"title": title, "points": rows, "time": time.time()}, indent=2))
    with written[1].open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (";".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in r.items()})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    base = points[0]
    swept = [p for p in points if p.tau is not None]
    for lengths in sorted({p.block_lengths for p in swept}):
        sel = [p for p in swept if p.block_lengths == lengths]
        lab = "l=" + ",".join(map(str, lengths))
        a1.plot([p.tau for p in sel], [p.tokens_per_s for p in sel], "o-", label=lab)
        a2.plot([p.tokens_per_s for p in sel], [p.nll for p in sel], "o-", label=lab)
        for p in sel:
            a2.annotate(f"τ={p.tau:g}", (p.tokens_per_s, p.nll), fontsize=7)
    a1.axhline(base.tokens_per_s, color="gray", ls="--", label="target alone")
    a2.scatter([base.tokens_per_s], [base.nll], color="gray", marker="s", label="target alone")
    a1.set(xlabel="τ (divergence threshold)", ylabel="tokens/s", title="throughput vs τ")
    a2.set(xlabel="tokens/s", ylabel="NLL under target (nats/token)", title="quality vs throughput")
    for a in (a1, a2):
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = out / "sweep.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    written.append(png)
    return written
