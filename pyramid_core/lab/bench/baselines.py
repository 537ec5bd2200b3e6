"""The HF rows of ``pyramid bench``: HF generate (eager, over the compiled stage, with a static
cache and ``torch.compile``), HF assisted generation and prompt lookup, with the greedy
reference the pyramid rows are checked against."""

from __future__ import annotations

from collections.abc import Sequence

from pyramid_core.backends.hf.baseline import (
    HF_GENERATE,
    HF_GENERATE_COMPILED,
    HF_GENERATE_FP32,
    HF_GENERATE_STATIC,
    run_baselines,
)
from pyramid_core.backends.hf.stage import HFStage
from pyramid_core.lab.bench.identity import first_divergence
from pyramid_core.lab.bench.report import BenchRow
from pyramid_core.protocols import Stage
from pyramid_core.types import SamplingConfig

__all__ = ["PLAIN_HF", "hf_rows", "judge_identity"]


PLAIN_HF = (HF_GENERATE, HF_GENERATE_COMPILED, HF_GENERATE_STATIC)


def judge_identity(row: BenchRow, target: Stage, cases: Sequence[tuple[str, Sequence[int], Sequence[int]]],
                   outputs: Sequence[Sequence[int]]) -> None:
    """Set ``row.identical``, ``row.mismatched_prompts`` and ``row.ties``: each output of
    ``cases`` (prompt id, prompt tokens, reference tokens) against its reference, a divergence
    at a numerical tie of the target's dtype not counting as a mismatch
    (``lab.bench.identity``)."""
    bad, ties = [], []
    for (pid, prompt, ref), out in zip(cases, outputs):
        d = first_divergence(target, prompt, ref, out)
        if d is None:
            continue
        if d.tie:
            ties.append(f"{pid}@{d.position} (margin {d.margin:.3g})")
        else:
            bad.append(pid)
    row.identical, row.mismatched_prompts, row.ties = not bad, bad, ties


def hf_rows(
    target: HFStage,
    draft: Stage,
    qualifier: Stage | None,
    encoded: list[list[int]],
    prompt_ids: list[str],
    max_new_tokens: int,
    stop_ids: list[int],
    lengths2: Sequence[int] | None,
    lengths3: Sequence[int] | None,
    qualifier_length: int | None,
    prompt_lookup_tokens: int,
    hf_compile: bool,
    sampling: SamplingConfig,
    progress: bool,
) -> tuple[list[BenchRow], list[list[int]] | None]:
    """The HF rows, and the greedy reference of the pyramid rows: the target's own greedy output in
    the pyramid rows' execution mode -- HF generate over the compiled stage when the target is
    compiled, plain HF generate otherwise ([compiled stages](../../algorithms.md#compiled-stages)).
    Eager HF rows (assisted, prompt lookup) are checked against plain HF generate; the other
    compiled rows say on how many prompts they agree with it."""
    # each assistant drafts as many tokens per round as our 2-stage row with the same draft
    assistants: list[tuple[str, HFStage, int]] = []
    if isinstance(draft, HFStage):
        assistants.append(("draft", draft, lengths2[0] if lengths2 else 4))
    if isinstance(qualifier, HFStage):
        assistants.append(("qualifier", qualifier, qualifier_length or (lengths3[1] if lengths3 else 8)))
    runs = run_baselines(target, encoded, max_new_tokens=max_new_tokens, stop_ids=stop_ids, assistants=assistants,
                         prompt_lookup_tokens=prompt_lookup_tokens, compiled=target.compiled,
                         static_compile=hf_compile, float32_reference=True, sampling=sampling, progress=progress)
    outputs = {r.label: [list(o) for o in r.outputs] for r in runs if r.ran}
    eager = outputs.get(HF_GENERATE) if sampling.is_greedy else None  # sampled text is compared by quality
    rows = []
    for run in runs:
        row = BenchRow(run.label, "hf", tokens=sum(len(o) for o in run.outputs), wall_s=run.wall_s,
                       target_forwards=run.target_forwards, note=run.note)
        if run.ran and eager is not None:
            bad = [pid for pid, o, r in zip(prompt_ids, outputs[run.label], eager) if o != r]
            if run.label == HF_GENERATE_FP32:  # another dtype: a reference, not a check
                row.note = (f"float32 reference: greedy output equal to the {target.dtype} run on "
                            f"{len(encoded) - len(bad)} of {len(encoded)} prompts")
            elif run.label in (HF_GENERATE_COMPILED, HF_GENERATE_STATIC):  # another execution mode
                row.note = (f"compiled: greedy output equal to eager HF generate on {len(encoded) - len(bad)} of "
                            f"{len(encoded)} prompts (float rounding may flip near-ties)")
                row.identical = True if run.label == HF_GENERATE_COMPILED else None
            else:
                judge_identity(row, target, list(zip(prompt_ids, encoded, eager)), outputs[run.label])
        rows.append(row)
    if not sampling.is_greedy:
        return rows, None
    refs = outputs.get(HF_GENERATE_COMPILED) if target.compiled else eager
    return rows, refs
