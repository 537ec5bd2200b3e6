"""Evaluation of distilled stages on held-out prompts.

``evaluate_stages`` measures what a pipeline cares about: along the target's own greedy
continuation, how often each stage's argmax equals the target's (and the next stage's), which is
the per-token acceptance of greedy speculative decoding; and each stage's forward time when
decoding one token with its KV cache (the cost ratios c). ``corpus_agreement`` measures the
same agreement on training text, to show memorisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch

from pyramid_core.errors import ConfigError
from pyramid_core.lab.distill.corpus import TrainSequence
from pyramid_core.lab.distill.heads import feature_argmax_along
from pyramid_core.lab.measure import measure_stage_time
from pyramid_core.protocols import FeatureReader

__all__ = ["StageReport", "evaluate_stages", "corpus_agreement", "feature_source", "confidence_bin", "CONFIDENCE_BINS"]


@attrs.define
class StageReport:
    name: str
    agreement_with_target: float
    agreement_with_next: float | None  # with the stage above it (None for the top stage)
    by_kind: dict[str, float]
    ms_per_forward: float
    cost_vs_next: float | None
    cost_vs_target: float
    # feature drafts: agreement with the target at draft depth 1, 2, ... (depth d read its own
    # predicted features for the last d-1 positions), i.e. the per-position acceptance
    by_depth: list[float] | None = None
    # agreement with the target at the positions where the target's probability of its own token
    # falls in each bin of CONFIDENCE_BINS (the target's report: the share of positions per bin)
    by_confidence: list[float] | None = None


FEATURE_DEPTHS = 4  # draft depths at which a feature draft's agreement is reported
# bins of the target's probability of its greedy token: where a draft's misses lie (a draft that
# misses what the target is sure of lacks the target's knowledge, not its calibration)
CONFIDENCE_BINS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)


def confidence_bin(p: float) -> int:
    """The index of the bin of ``CONFIDENCE_BINS`` that holds probability ``p``."""
    return min(sum(p >= edge for edge in CONFIDENCE_BINS[1:-1]), len(CONFIDENCE_BINS) - 2)


def feature_source(stages: Sequence[Any], i: int) -> Any:
    """The stage a feature draft at index ``i`` reads (``FeatureReader.feature_from``)."""
    return stages[-1] if getattr(stages[i], "feature_from", None) == "target" else stages[i + 1]


@torch.inference_mode()
def _probability_along(stage: Any, prompt: list[int], continuation: list[int]) -> list[float]:
    """The stage's probability of ``continuation[i]`` after ``prompt + continuation[:i]`` for every i."""
    ids = torch.tensor([prompt + continuation[:-1]], device=stage.device)
    logits = stage.model(input_ids=ids).logits[0, len(prompt) - 1:, : stage.vocab_size].float()
    chosen = torch.tensor(continuation, device=logits.device).unsqueeze(1)
    return [float(p) for p in torch.softmax(logits, dim=-1).gather(1, chosen).squeeze(1).tolist()]


@torch.inference_mode()
def _argmax_along(stage: Any, prompt: list[int], continuation: list[int]) -> list[int]:
    """The stage's argmax after ``prompt + continuation[:i]`` for every i (one forward, no cache)."""
    ids = torch.tensor([prompt + continuation[:-1]], device=stage.device)
    logits = stage.model(input_ids=ids).logits[0, len(prompt) - 1:, : stage.vocab_size]
    return [int(i) for i in logits.argmax(-1).tolist()]


def evaluate_stages(stages: Sequence[Any], prompts: Sequence[tuple[str, list[int]]], new_tokens: int, *,
                    timing_repeats: int = 30, progress: bool = True) -> list[StageReport]:
    """``stages`` smallest first, the target last (``HFStage``s, or feature drafts: evaluated
    on the features of the stage they read, ``feature_argmax_along``); ``prompts`` (kind, token
    ids) held out from training. Agreement = fraction of positions of the target's greedy
    continuation where a stage's argmax equals the target's token (resp. the next stage's
    argmax)."""
    from tqdm.auto import tqdm

    if len(stages) < 2:
        raise ConfigError("evaluate_stages needs at least one stage and the target")
    target = stages[-1]
    hits_t = [0] * len(stages)
    hits_n = [0] * len(stages)
    kind_hits: list[dict[str, list[int]]] = [{} for _ in stages]
    depth_hits: dict[int, list[int]] = {}
    n_bins = len(CONFIDENCE_BINS) - 1
    bin_hits = [[0] * n_bins for _ in stages]
    bin_total = [0] * n_bins
    total = 0
    for kind, prompt in tqdm(prompts, desc="held-out agreement", disable=not progress):
        cont = _greedy(target, prompt, new_tokens)
        if not cont:
            continue
        argmaxes = []
        for i, s in enumerate(stages):
            if isinstance(s, FeatureReader):  # teacher forcing needs its source's features
                per_depth = feature_argmax_along(s, feature_source(stages, i), prompt, cont, FEATURE_DEPTHS)
                argmaxes.append(per_depth[0])
                hits = depth_hits.setdefault(i, [0] * FEATURE_DEPTHS)
                for d, am_d in enumerate(per_depth):
                    hits[d] += sum(a == b for a, b in zip(am_d, cont))
            else:
                argmaxes.append(_argmax_along(s, prompt, cont))
        total += len(cont)
        bins = [confidence_bin(p) for p in _probability_along(target, prompt, cont)]
        for b in bins:
            bin_total[b] += 1
        for i, am in enumerate(argmaxes):
            for b, a, t in zip(bins, am, cont, strict=True):
                bin_hits[i][b] += a == t
            same_t = sum(a == b for a, b in zip(am, cont))
            hits_t[i] += same_t
            k = kind_hits[i].setdefault(kind, [0, 0])
            k[0] += same_t
            k[1] += len(cont)
            if i + 1 < len(stages):
                hits_n[i] += sum(a == b for a, b in zip(am, argmaxes[i + 1]))
    if total == 0:
        raise ConfigError("the target produced no tokens on the evaluation prompts")
    context_len = len(prompts[0][1]) + min(32, new_tokens)
    ms = [1000 * measure_stage_time(s, context_len, timing_repeats, warmup=3) for s in stages]
    reports = []
    for i, s in enumerate(stages):
        top = i + 1 == len(stages)
        reports.append(StageReport(
            name=str(getattr(s, "name", f"stage {i + 1}")),
            agreement_with_target=hits_t[i] / total,
            agreement_with_next=None if top else hits_n[i] / total,
            by_kind={k: v[0] / v[1] for k, v in kind_hits[i].items()},
            ms_per_forward=ms[i],
            cost_vs_next=None if top else ms[i] / ms[i + 1],
            cost_vs_target=ms[i] / ms[-1],
            by_depth=[h / total for h in depth_hits[i]] if i in depth_hits else None,
            by_confidence=([n / total for n in bin_total] if top else
                           [h / n if n else float("nan") for h, n in zip(bin_hits[i], bin_total, strict=True)]),
        ))
    return reports


@torch.inference_mode()
def _greedy(target: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """The target's greedy continuation (stops after an end-of-sequence token)."""
    model = target.model
    ids = torch.tensor([prompt], device=target.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                         temperature=None, top_k=None, top_p=None, pad_token_id=0)
    cont = [int(t) for t in out[0, len(prompt):].tolist()]
    eos = getattr(getattr(target, "tokenizer", None), "eos_token_id", None)
    if eos is not None and eos in cont:
        cont = cont[: cont.index(eos) + 1]
    return cont


@torch.inference_mode()
def corpus_agreement(stage: Any, sequences: Sequence[TrainSequence], sample: int, seed: int = 0,
                     source: Any = None) -> dict[str, float]:
    """Top-1 agreement of ``stage`` with the target's stored argmax on ``sample`` corpus
    sequences drawn with ``seed``, per source ("greedy", "sampled", "python"). Next to the
    held-out agreement it shows how much a student memorised instead of generalising. A feature
    draft reads the features of ``source`` (depth 1, as ``evaluate_stages`` measures it)."""
    if isinstance(stage, FeatureReader) and source is None:
        raise ConfigError("corpus_agreement: a feature draft needs the stage whose features it reads (source=)")
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(sequences), generator=g)[:sample].tolist()
    hits: dict[str, list[int]] = {}
    for i in picked:
        s = sequences[i]
        prompt, cont = s.tokens[: s.start + 1], s.tokens[s.start + 1: s.start + 1 + s.n_targets]
        am = (feature_argmax_along(stage, source, prompt, cont)[0] if isinstance(stage, FeatureReader)
              else _argmax_along(stage, prompt, cont))
        same = sum(a == b for a, b in zip(am, s.rows.ids[:, 0].tolist(), strict=False))
        h = hits.setdefault(s.source, [0, 0])
        h[0] += same
        h[1] += len(cont)
    return {src: h[0] / h[1] for src, h in sorted(hits.items())}
