"""``pyramid bench``: our pipelines next to Hugging Face decoding, same prompts, same machine,
greedy, one run.

Rows: the target alone with HF ``generate`` (the baseline every speedup is relative to), HF
assisted generation (``assistant_model=`` the draft model) and HF prompt-lookup decoding, when
the installed transformers supports them; then pyramid pipelines: the target alone (N = 1),
``ngram -> target``, ``draft -> target``, ``ngram -> draft -> target`` and a token-tree draft.

Every lossless row's greedy output is compared, prompt by prompt, with the target's greedy
output from HF ``generate``; a mismatch is recorded in the result (and the CLI exits non-zero).
For chain pipelines the latency model (``pyramid_core.lab.latency.predict_chain``, finite horizon)
predicts the speedup from alpha per boundary and the forward cost T(M) per stage measured in the
same run, M being the number of tokens a forward feeds.

Why T(M) is timed rather than taken from the pipeline metrics: the metrics count forwards and
positions per stage, not the tokens each forward fed nor the time per M, and nearly all of a
row's verifications feed the same M = ell + 1 -- one point of a curve that on a CPU is far from
flat (docs/algorithms.md). So each model stage is timed once per run, the first time a row needs
it, at every M = 1 .. (longest block length + 2) that ``predict_chain`` may charge
(``measure.measure_stage_costs``: warm-up + 5 timed forwards per M, after a context of the mean
prompt length + half the new tokens), and reused by every row with that stage. A model-free
first stage keeps the time the metrics measured (0: its cost is framework overhead).
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from pyramid_core.backends.hf.baseline import HF_GENERATE, versions
from pyramid_core.backends.hf.head_stage import FeatureStage
from pyramid_core.backends.hf.stage import HFStage
from pyramid_core.build import PipelineSpec
from pyramid_core.devices import cpu_name
from pyramid_core.errors import ConfigError, PyramidError
from pyramid_core.lab.bench.baselines import PLAIN_HF, hf_rows, judge_identity
from pyramid_core.lab.bench.report import TARGET_ALONE, BenchResult, BenchRow
from pyramid_core.lab.latency.chain import predict_chain
from pyramid_core.lab.latency.cost import ForwardCost
from pyramid_core.lab.measure import (
    alpha_for_tokens_per_forward,
    length_distributions,
    measure_alpha,
    measure_stage_costs,
)
from pyramid_core.lab.outputs import RecordLog
from pyramid_core.lab.prompts import Prompt, encode_prompt
from pyramid_core.lab.quality import (
    TokenScores,
    excess_price,
    first_token_tv,
    paired_delta,
    score_text,
)
from pyramid_core.pipeline import Metrics, Pipeline
from pyramid_core.plugins import Registries, registries
from pyramid_core.protocols import AcceptancePolicy, Proposer, Stage, tokenizer_of
from pyramid_core.registry import parse_spec
from pyramid_core.types import SamplingConfig

__all__ = ["BenchConfig", "default_configs", "feature_configs", "run_bench"]


@attrs.frozen
class BenchConfig:
    """One pyramid pipeline to benchmark: stages smallest first (specs or loaded stages), a
    policy and a block length per boundary (or a preset), an optional stage wrapper spec
    (``tree``) and an optional lookup asked first each round (``lookup``, a proposer spec), or
    grafted into the bottom stage's block (``lookup_graft``).
    ``lossless`` configurations are asserted token-identical to the target's greedy output."""

    label: str
    stages: tuple[str | Stage | Proposer, ...]
    policies: tuple[str | AcceptancePolicy, ...] = ()
    block_lengths: tuple[int, ...] = ()
    tree: str | None = None
    lossless: bool = True
    preset: str | None = None
    length_schedule: str = "fixed"
    confidence_stop: float = 0.0
    lookup: str | None = None
    lookup_graft: bool = False

    def describe(self) -> dict[str, Any]:
        """The configuration as JSON (stages by spec, or by name when loaded), as results record it."""
        return {"label": self.label, "stages": [s if isinstance(s, str) else str(getattr(s, "name", s)) for s in self.stages],
                "policies": [p if isinstance(p, str) else type(p).__name__ for p in self.policies],
                "block_lengths": list(self.block_lengths), "tree": self.tree, "preset": self.preset,
                "lossless": self.lossless, "length_schedule": self.length_schedule,
                "confidence_stop": self.confidence_stop, "lookup": self.lookup, "lookup_graft": self.lookup_graft}

    def spec(self, sampling: SamplingConfig, stop_ids: Sequence[int]) -> PipelineSpec:
        return PipelineSpec(self.stages, self.policies or None, self.block_lengths or None, self.preset, self.tree,
                            sampling, stop_ids=tuple(stop_ids), length_schedule=self.length_schedule,
                            confidence_stop=self.confidence_stop, lookup=self.lookup, lookup_graft=self.lookup_graft)


def _lookup_label(lookup: str, row: str) -> str:
    """``ngram+draft→target``: a row with ``lookup`` asked first, named by the proposer."""
    return f"{parse_spec(lookup)[0]}+{row}"


def _graft_label(lookup: str, row: str) -> str:
    """``tree feature→target, ngram grafted``: a row with ``lookup``'s block grafted into the draft's."""
    return f"{row}, {parse_spec(lookup)[0]} grafted"


def default_configs(
    target: str | Stage,
    draft: str | Stage,
    *,
    qualifier: str | Stage | None = None,
    ngram: str = "ngram",
    tree: str = "tree:budget=8,branching=4",
    lengths2: Sequence[int] | None = None,
    lengths3: Sequence[int] | None = None,
    qualifier_length: int | None = None,
    lookup: str | None = None,
) -> list[BenchConfig]:
    """The pyramid rows: target alone, ngram -> target, 2-stage exact with each draft (and the
    draft with the adaptive length schedule and a confidence stop; with a ``lookup``, the draft
    drafting only where the lookup proposes nothing), then with a qualifier the
    3-stage ``sd`` chain, the same with block verification at both boundaries, ``psd-a`` and
    ``psd-f`` (lossy: PyramidSD's policies at the ``sd`` row's block lengths) and token trees at
    the bottom of the 2- and 3-stage chains; without one, ngram -> draft -> target and a tree
    draft -> target. Rows name the plugins
    they benchmark; a row whose plugin is not loaded is reported as not run."""
    ell2 = tuple(lengths2) if lengths2 else (4,)
    ell3 = tuple(lengths3) if lengths3 else (4, 8)
    rows = [
        BenchConfig(TARGET_ALONE, (target,)),
        BenchConfig("ngram→target", (ngram, target), ("exact",), ell2),
        BenchConfig("draft→target", (draft, target), ("exact",), ell2),
        BenchConfig("draft→target, adaptive ℓ, stop < 0.4", (draft, target), ("exact",), ell2,
                    length_schedule="adaptive", confidence_stop=0.4),
    ]
    if lookup is not None:
        rows.append(BenchConfig(_lookup_label(lookup, "draft→target"), (draft, target), ("exact",), ell2, lookup=lookup))
    if qualifier is None:
        return rows + [
            BenchConfig("ngram→draft→target", (ngram, draft, target), ("exact", "exact"), ell3),
            BenchConfig("tree draft→target", (draft, target), ("exact",), ell2, tree=tree),
        ]
    rows.append(BenchConfig("qualifier→target", (qualifier, target), ("exact",), (qualifier_length or ell3[1],)))
    rows.append(BenchConfig("sd: draft→qualifier→target", (draft, qualifier, target), ("exact", "exact"), ell3))
    rows.append(BenchConfig("sd, block: draft→qualifier→target", (draft, qualifier, target), ("block", "block"), ell3))
    for name in ("psd-a", "psd-f"):
        rows.append(BenchConfig(f"{name}: draft→qualifier→target", (draft, qualifier, target), block_lengths=ell3,
                                preset=name, lossless=False))
    rows.append(BenchConfig("tree draft→target", (draft, target), ("exact",), ell2, tree=tree))
    rows.append(BenchConfig("tree draft→qualifier→target", (draft, qualifier, target), ("exact", "exact"), ell3, tree=tree))
    return rows


def feature_configs(
    target: str | Stage,
    feature: str | Stage,
    *,
    qualifier: str | Stage | None = None,
    length: int = 2,
    tree: str = "tree:budget=8,branching=4",
    qualifier_length: int = 3,
    lookup: str | None = None,
    tree_length: int | None = None,
) -> list[BenchConfig]:
    """The feature-draft rows (EAGLE family, [feature-level
    drafts](../../algorithms.md#feature-level-drafts)): ``feature`` -> target as a chain of
    ``length`` tokens and as a token tree through ``tree`` grown ``tree_length`` deep (default
    ``length``), and with a ``lookup`` both again with
    the lookup asked first ([lookup first](../../algorithms.md#lookup-first)) and with its block
    grafted into the head's ([lookup graft](../../algorithms.md#lookup-graft)); with a qualifier, ``feature`` ->
    qualifier -> target at ``(length, max(length, qualifier_length))``. Give a ``feature`` that
    reads the target (``features_from=target``): in the 2-stage rows that is the next stage, and
    across the qualifier it reads the target's features where the target has scored a position and
    its own predicted ones elsewhere (the stand-in rule of the same section)."""
    depth = length if tree_length is None else tree_length
    rows = [
        BenchConfig("feature→target", (feature, target), ("exact",), (length,)),
        BenchConfig("tree feature→target", (feature, target), ("exact",), (depth,), tree=tree),
    ]
    if lookup is not None:
        rows += [BenchConfig(_lookup_label(lookup, "feature→target"), (feature, target), ("exact",), (length,),
                             lookup=lookup),
                 BenchConfig(_lookup_label(lookup, "tree feature→target"), (feature, target), ("exact",), (depth,),
                             tree=tree, lookup=lookup),
                 BenchConfig(_graft_label(lookup, "feature→target"), (feature, target), ("exact",), (length,),
                             lookup=lookup, lookup_graft=True),
                 BenchConfig(_graft_label(lookup, "tree feature→target"), (feature, target), ("exact",), (depth,),
                             tree=tree, lookup=lookup, lookup_graft=True)]
    if qualifier is not None:
        rows.append(BenchConfig("feature→qualifier→target", (feature, qualifier, target),
                                ("exact", "exact"), (length, max(length, qualifier_length))))
    return rows


@attrs.define
class _ForwardCosts:
    """T(M) per model stage, timed once per run (module docstring) and shared by the rows."""

    context_len: int
    repeats: int = 5
    measured: dict[int, tuple[Stage, ForwardCost]] = attrs.field(factory=dict)  # id -> (kept alive, T)
    # by stage name: costs a resumed run measured before (``RecordLog``), reused when they cover M
    restored: dict[str, ForwardCost] = attrs.field(factory=dict)

    def __call__(self, stage: Stage, max_m: int) -> ForwardCost:
        """T(M) of ``stage`` measured at least at M = 1 .. ``max_m`` (timed now if not yet)."""
        got = self.measured.get(id(stage))
        before = self.restored.get(stage.name)
        if got is None and before is not None and before.points[-1][0] >= max_m:
            got = (stage, before)
            self.measured[id(stage)] = got
        if got is None or got[1].points[-1][0] < max_m:
            got = (stage, measure_stage_costs(stage, self.context_len, range(1, max_m + 1), self.repeats))
            self.measured[id(stage)] = got
        return got[1]

    def restore(self, costs: dict[str, list[list[float]]]) -> None:
        """Costs from ``as_dict`` of an earlier, interrupted run."""
        for name, points in costs.items():
            self.restored[name] = ForwardCost([(int(m), float(t)) for m, t in points], name)

    def as_dict(self) -> dict[str, list[list[float]]]:
        """``{stage name: [[M, seconds], ...]}`` for the JSON report."""
        out = {name: cost.as_list() for name, cost in self.restored.items()}
        out.update({cost.name: cost.as_list() for _, cost in self.measured.values()})
        return out


Job = tuple[int, list[int], int]
"""(prompt index, prompt token ids, seed): one generation of a row."""


def _pyramid_row(
    cfg: BenchConfig,
    pipe: Pipeline,
    jobs: list[Job],
    prompt_ids: list[str],
    refs: list[list[int]] | None,
    max_new_tokens: int,
    costs: _ForwardCosts,
    quality: _Quality | None,
) -> BenchRow:
    pipe.generate(jobs[0][1], min(2, max_new_tokens))  # warm-up (first-call allocations)
    runs: list[Metrics] = []
    outputs: list[list[int]] = []
    for _, ids, seed in jobs:
        gen = pipe.generate(ids, max_new_tokens, seed=seed)
        runs.append(gen.metrics)
        outputs.append(gen.token_list)
    m = Metrics.pool(runs)
    row = BenchRow(cfg.label, "pyramid", lossless=cfg.lossless, block_lengths=list(pipe.block_lengths))
    row.tokens, row.wall_s, row.target_forwards = m.new_tokens, m.wall_s, m.target_forwards
    row.acceptance = [b.accepted_per_proposed for b in m.boundaries]
    row.acceptance_per_try = [b.acceptance_per_try for b in m.boundaries]
    row.accepted_per_proposed = list(row.acceptance)
    row.acceptance_by_position = [b.as_dict()["acceptance_by_position"] for b in m.boundaries]
    alphas = measure_alpha(m) if m.boundaries else []
    row.alpha = alphas
    for st in m.stages:
        row.stages.append({"name": st.name, "forwards": st.forwards, "forward_s": st.forward_s,
                           "ms_per_forward": 1000 * st.seconds_per_forward if st.forwards else math.nan})
    row.overhead_fraction = m.overhead_s / m.wall_s if m.wall_s > 0 else math.nan
    if refs is not None:  # after the timing: tie checks run target forwards
        judge_identity(row, pipe.target, [(prompt_ids[i], ids, refs[i]) for i, ids, _ in jobs], outputs)
    if m.lookup is not None:
        where = "every round, the lookup's block grafted beside it" if cfg.lookup_graft else "the others"
        row.note = (f"the lookup proposed in {m.lookup.hits} of {m.lookup.tries} rounds, the first stage drafted in "
                    f"{where}: the chain latency model does not apply (no prediction)")
    elif cfg.tree is not None:
        row.note = "token tree: the chain latency model does not apply (no prediction)"
    elif all(math.isfinite(a) for a in alphas) and row.tokens:
        _predict(row, pipe, m, alphas, len(jobs), costs)
    if m.boundaries and m.stages[0].forwards == 0:
        row.note = (row.note + "; " if row.note else "") + "model-free first stage: its time counts as overhead (T_1 = 0)"
    if quality is not None:  # after the timing: the NLL forwards are not part of the row's time
        quality.score(row, pipe, [(ids, out) for (_, ids, _), out in zip(jobs, outputs)])
    return row


@attrs.define
class _Quality:
    """Sampled benches: each row's price (``quality.excess_price``), its NLL difference from the
    target's own text of the same prompt and seed (``quality.paired_delta``; the first row scored,
    the target alone, is the reference) and the next-token TV at prefixes of the reference's texts
    (``quality.first_token_tv``, chains of model stages without feature drafts)."""

    target: Stage
    sampling: SamplingConfig
    prefixes: int = 8
    tv_samples: int = 2000
    reference: list[TokenScores] | None = None
    cuts: list[list[int]] = attrs.field(factory=list)

    def score(self, row: BenchRow, pipe: Pipeline, texts: list[tuple[list[int], list[int]]]) -> None:
        scores = [score_text(self.target, self.sampling, ids, out) for ids, out in texts]
        nlls = [s.mean_nll for s in scores if s.tokens and math.isfinite(s.mean_nll)]
        if not nlls:
            return
        row.nll = statistics.fmean(nlls)
        if self.reference is None:  # the target's own texts: their halves are the TV's prefixes
            self.reference = scores
            self.cuts = [ids + out[: len(out) // 2] for ids, out in texts[: self.prefixes] if out]
        price, delta = excess_price(scores), paired_delta(scores, self.reference)
        row.price, row.price_ci95 = price.mean, price.ci95
        row.nll_delta, row.nll_delta_ci95 = delta.mean, delta.ci95
        if self.cuts and all(isinstance(s, Stage) and not isinstance(s, FeatureStage) for s in pipe.stages):
            tv = first_token_tv(pipe, self.cuts, samples=self.tv_samples)
            row.tv, row.tv_floor = tv.tv, tv.floor


def _predict(row: BenchRow, pipe: Pipeline, m: Metrics, alphas: list[float], prompts: int,
             costs: _ForwardCosts) -> None:
    """The latency model's speedup over the target alone for ``row``: per prompt, the prefill of
    every stage as measured in the run, plus the finite-horizon decode time of ``predict_chain``
    for the mean number of new tokens, with T(M) per stage timed in this run; against the
    target's own prefill plus one T(1) per token. A model-free first stage of a 2-stage chain
    gets its effective alpha (the one that reproduces its measured tokens per target forward,
    as the planner measures it: ``measure.measure_proposer_alpha``), since rounds where it
    proposes nothing never enter the per-position counts."""
    per_prompt = max(1, round(row.tokens / prompts))
    lengths: list[int | dict[int, float]] = list(pipe.block_lengths)
    if pipe.length_schedule != "fixed":  # the lengths the schedule chose, as realised
        lengths = list(length_distributions(m))
    elif pipe.confidence_stop and m.stages[0].forwards:  # the bottom's blocks ended by its confidence
        lengths[0] = length_distributions(m)[0]
    if len(pipe.stages) == 2 and m.stages[0].forwards == 0 and m.target_forwards:
        alphas = [alpha_for_tokens_per_forward(m.tokens_per_target_forward, pipe.block_lengths[0], per_prompt)]
    # a verification feeds at most ell + 2 tokens, stage 1's first draft step at most N
    max_m = max([len(pipe.stages), *(ell + 2 for ell in pipe.block_lengths)])
    stage_costs: list[float | ForwardCost] = [
        costs(s, max_m) if isinstance(s, Stage) else st.seconds_per_forward for s, st in zip(pipe.stages, m.stages)]
    pred = predict_chain(alphas, lengths, stage_costs, new_tokens=per_prompt)
    prefill = sum(st.prefill_s for st in m.stages) / prompts
    alone = m.stages[-1].prefill_s / prompts + per_prompt * pred.target_time_per_token
    row.predicted_speedup = alone / (prefill + per_prompt * pred.time_per_token)
    row.predicted_tokens_per_target_forward = pred.tokens_per_target_forward


def set_gains(rows: Sequence[BenchRow]) -> None:
    """``BenchRow.gain``: pyramid rows over pyramid N = 1, HF assisted and prompt-lookup rows over
    eager HF generate -- speculation's own gain, apart from the runtime's."""
    by_label = {r.label: r for r in rows if r.tokens}
    alone, hf_eager = by_label.get(TARGET_ALONE), by_label.get(HF_GENERATE)
    for r in rows:
        base = alone if r.framework == "pyramid" else (
            hf_eager if r.label.startswith(("HF assisted", "HF prompt lookup")) else None)
        if r.tokens and base is not None and base.tokens_per_s > 0:
            r.gain = r.tokens_per_s / base.tokens_per_s


def run_bench(
    target: Stage,
    draft: Stage,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    ngram: str = "ngram",
    tree: str = "tree:budget=8,branching=4",
    lengths2: Sequence[int] | None = None,
    lengths3: Sequence[int] | None = None,
    prompt_lookup_tokens: int = 10,
    qualifier: Stage | None = None,
    qualifier_length: int | None = None,
    configs: Sequence[BenchConfig] | None = None,
    extra: Sequence[BenchConfig] = (),
    chat: bool = True,
    hf: bool = True,
    hf_compile: bool = False,
    sampling: SamplingConfig | None = None,
    seeds: int = 1,
    progress: bool = True,
    regs: Registries | None = None,
    log: RecordLog | None = None,
) -> BenchResult:
    """Benchmark decoding of ``prompts`` with HF and pyramid configurations (module docstring).
    ``target`` and ``draft`` are loaded model stages (``HFStage`` for the HF rows); ``configs``
    replaces the default pyramid rows, ``extra`` adds rows after them; ``hf_compile`` adds HF
    generate with a static cache and ``torch.compile``. Greedy by default (every lossless row
    asserted token-identical to the target); with a sampling ``sampling``, every prompt is run
    with ``seeds`` seeds and every row reports the NLL of its text under the target next to the
    target's own samples (``BenchRow.nll_delta``).

    ``log``: each finished piece -- the HF rows with the greedy reference, then each pyramid
    row with the T(M) measured so far -- is appended as soon as it is measured, and pieces the
    log already holds (a rerun after an interruption, same arguments) are taken from it, not
    run again."""
    from tqdm import tqdm

    regs = regs or registries()
    tok = tokenizer_of(target)
    if tok is None:
        raise ConfigError(f"bench needs a target stage with a tokenizer (to encode the prompts); {target.name!r} has none")
    encoded = [encode_prompt(tok, p.text, chat) for p in prompts]
    prompt_ids = [p.id for p in prompts]
    sampling = sampling or SamplingConfig.greedy()
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    greedy = sampling.is_greedy
    seeds = 1 if greedy else seeds
    jobs: list[Job] = [(i, ids, s * 1000 + i) for s in range(seeds) for i, ids in enumerate(encoded)]
    base = PipelineSpec((target,), sampling=sampling).resolve(regs)
    stop_ids = list(base.stop_ids)
    rows: list[BenchRow] = []
    baselines: list[BenchRow] = []  # HF generate of the target alone, each configuration
    refs: list[list[int]] | None = None
    done = log.get("reference") if log is not None else None
    if done is not None:  # a resumed run: the HF rows and the reference as measured before
        hf_row_list, refs = [BenchRow.from_dict(r) for r in done["hf_rows"]], done["refs"]
    else:
        hf_row_list = []
        if hf and isinstance(target, HFStage):
            hf_row_list, refs = hf_rows(target, draft, qualifier, [ids for _, ids, _ in jobs], prompt_ids,
                                        max_new_tokens, stop_ids, lengths2, lengths3, qualifier_length,
                                        prompt_lookup_tokens, hf_compile, sampling, progress)
        if refs is None and greedy:  # no HF baseline: the reference is the target alone through pyramid
            refs = [base.generate(ids, max_new_tokens).token_list for ids in encoded]
        if log is not None:
            log.append("reference", {"hf_rows": [r.as_dict() for r in hf_row_list], "refs": refs})
    rows += hf_row_list
    baselines = [r for r in hf_row_list if r.label in PLAIN_HF and r.tokens]
    quality = None if greedy else _Quality(target, sampling)
    todo = list(configs) if configs is not None else default_configs(
        target, draft, qualifier=qualifier, ngram=ngram, tree=tree, lengths2=lengths2, lengths3=lengths3,
        qualifier_length=qualifier_length)
    todo += list(extra)
    mean_prompt = sum(len(ids) for ids in encoded) / max(1, len(encoded))
    costs = _ForwardCosts(max(1, round(mean_prompt + max_new_tokens / 2)))
    for cfg in tqdm(todo, desc="bench pyramid", disable=not progress):
        key = f"pyramid: {cfg.label}"
        done = log.get(key) if log is not None else None
        if done is not None:
            rows.append(BenchRow.from_dict(done["row"]))
            costs.restore(done["forward_costs"])
            continue
        try:
            pipe = cfg.spec(sampling, stop_ids).resolve(regs)
        except PyramidError as exc:
            row = BenchRow(cfg.label, "pyramid", lossless=cfg.lossless,
                           note=f"not run: {type(exc).__name__}: {exc}"[:200])
        else:
            row = _pyramid_row(cfg, pipe, jobs, prompt_ids, refs if greedy else None, max_new_tokens, costs, quality)
        rows.append(row)
        if log is not None:
            log.append(key, {"row": row.as_dict(), "forward_costs": costs.as_dict()})
    # every speedup is over the fastest baseline configuration measured in this run
    fastest = max(baselines, key=lambda r: r.tokens_per_s) if baselines else rows[len(rows) - len(todo)]
    ref_tps = fastest.tokens_per_s
    for r in rows:
        r.speedup = r.tokens_per_s / ref_tps if r.tokens and ref_tps > 0 else math.nan
    set_gains(rows)
    meta = {
        "prompts": len(prompts),
        "sampling": attrs.asdict(sampling),
        "seeds": seeds,
        "prompt_ids": prompt_ids,
        "max_new_tokens": max_new_tokens,
        "target": target.name,
        "draft": draft.name,
        "qualifier": qualifier.name if qualifier is not None else None,
        "device": f"{target.device}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
                  f"{versions() if isinstance(target, HFStage) else 'no HF backend'}, "
                  f"{platform.processor() or platform.machine()}",
        "baseline": fastest.label,
        "dtype": str(getattr(target, "dtype", "")).removeprefix("torch."),
        "cpu": cpu_name(),
        "modes": {s.name: s.mode_summary for s in (target, draft, qualifier) if isinstance(s, HFStage)},
        "compiled": bool(getattr(target, "compiled", False)),
        "forward_costs": costs.as_dict(),
        "time": time.time(),
    }
    return BenchResult(rows, meta)

