"""Fault injection (``pyramid_core.testing.faults``): stages that return NaN / inf, raise in the
middle of a forward, or return the wrong width, at a chosen call. The error names the stage and
the position, and the pipeline is consistent afterwards: the next generation of the same
pipeline is greedy-identical to the target's own decoding, and a sampled one is bit-identical to
a fresh pipeline's with the same seed (every cache rolled back or reset)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pytest
import stats
import torch

from pyramid_core import SamplingConfig, build_pipeline
from pyramid_core.backends.hf import HFStage
from pyramid_core.errors import NonFiniteError, NonFiniteWarning, StageOutputError
from pyramid_core.testing import FaultyStage, InjectedFault, TableModel, fail_module

PROMPT = [3, 5, 7, 11, 13, 5, 7]
NEW = 24
GREEDY = SamplingConfig.greedy()


def hf_greedy(model: Any, prompt: list[int], n: int = NEW) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return [int(t) for t in out[0, len(prompt):]]


@pytest.fixture(scope="module")
def models(tiny_models: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v) for k, v in tiny_models.items()}


@pytest.fixture(scope="module")
def reference(models: dict[str, Any]) -> list[int]:
    return hf_greedy(models["target"], PROMPT)


# --- item 1: NaN / inf logits ---------------------------------------------------------------------


def test_nan_in_a_target_column_is_an_error_not_a_wrong_argmax() -> None:
    """Before: a target with NaN in column 1 made every greedy token 1 (the true argmax is 3)."""
    target = FaultyStage(TableModel([0.1, 0.2, 0.3, 0.4], name="target"), "nan", column=1, persistent=True)
    pipe = build_pipeline([TableModel([0.4, 0.3, 0.2, 0.1], name="draft"), target], block_lengths=[3], sampling=GREEDY)
    with pytest.raises(NonFiniteError, match=r"stage 'target' returned the logit nan for token id 1 at position 1 "
                                             r"\(row 0 of the 4 rows of this forward: the next-token distribution "
                                             r"after 1 tokens\); pass on_nonfinite='warn'"):
        pipe.generate([0], 5)


def test_nan_while_sampling_names_the_stage_instead_of_an_index_error() -> None:
    """Before: ``IndexError: index -1 is out of bounds`` naming no stage."""
    draft = FaultyStage(TableModel([0.4, 0.3, 0.2, 0.1], name="draft"), "nan", column=2, at_call=3)
    pipe = build_pipeline([draft, TableModel([0.1, 0.2, 0.3, 0.4], name="target")], block_lengths=[4])
    with pytest.raises(NonFiniteError, match=r"stage 'draft' returned the logit nan for token id 2 at position 3"):
        pipe.generate([0], 8, seed=0)


@pytest.mark.parametrize(("fault", "what"), [("inf", r"the logit inf for token id 3"),
                                             ("-inf-row", r"no finite logit \(every entry is -inf\)")])
def test_inf_and_empty_rows_are_named(fault: str, what: str) -> None:
    target = FaultyStage(TableModel([0.1, 0.2, 0.3, 0.4], name="target"), fault, column=3, row=2, at_call=1)  # type: ignore[arg-type]
    pipe = build_pipeline([TableModel([0.25] * 4, name="draft"), target], block_lengths=[3])
    with pytest.raises(NonFiniteError, match=rf"stage 'target' returned {what} at position 3 \(row 2 of the 4 rows"):
        pipe.generate([0], 6, seed=1)


def test_an_hf_lm_head_row_of_nan_is_named_with_its_token(models: dict[str, Any]) -> None:
    """Before: a tiny HF model with NaN in one LM-head row emitted that token forever."""
    broken = copy.deepcopy(models["target"])
    with torch.no_grad():
        broken.lm_head.weight[17] = torch.nan
    pipe = build_pipeline([HFStage(broken, name="broken")], sampling=GREEDY, stop_ids=[])
    with pytest.raises(NonFiniteError, match=r"stage 'broken' returned the logit nan for token id 17 at position 7 "
                                             r"\(row 0 of the 1 rows"):
        pipe.generate(PROMPT, 5)


def test_warn_mode_gives_nan_entries_zero_probability(models: dict[str, Any]) -> None:
    """``on_nonfinite="warn"``: one warning per stage and broken token, the token is never
    emitted, and the rest is the model's greedy decoding with that token masked out."""
    broken = copy.deepcopy(models["target"])
    with torch.no_grad():
        broken.lm_head.weight[17] = torch.nan
    pipe = build_pipeline([HFStage(broken, name="broken")], sampling=GREEDY, stop_ids=[], on_nonfinite="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        tokens = pipe.generate(PROMPT, NEW).token_list
    messages = {str(w.message) for w in caught if issubclass(w.category, NonFiniteWarning)}
    assert messages == {"stage 'broken' returned the logit nan for token id 17; NaN and +inf entries get zero "
                        "probability (on_nonfinite='warn')"}
    ctx, expected = list(PROMPT), []
    with torch.no_grad():
        for _ in range(NEW):
            logits = broken(torch.tensor([ctx])).logits[0, -1]
            logits[17] = -torch.inf
            expected.append(int(logits.argmax()))
            ctx.append(expected[-1])
    assert tokens == expected and 17 not in tokens


def test_warn_mode_still_refuses_a_row_with_nothing_left() -> None:
    target = FaultyStage(TableModel([0.1, 0.2, 0.3, 0.4], name="target"), "-inf-row", at_call=1)
    pipe = build_pipeline([TableModel([0.25] * 4), target], block_lengths=[2], on_nonfinite="warn")
    with pytest.raises(NonFiniteError, match=r"returned no finite logit"):
        pipe.generate([0], 4, seed=0)


def test_warn_mode_sampling_stays_exact_on_the_surviving_tokens() -> None:
    """A draft with NaN in column 0 of every row, warn mode: its rows are the table without
    token 0 renormalised, and the exact policy still samples the target exactly. 3000 runs x 1
    token, chi-square at ALPHA."""
    draft = FaultyStage(TableModel([0.4, 0.3, 0.2, 0.1], name="draft"), "nan", column=0, persistent=True)
    target = [0.1, 0.2, 0.3, 0.4]
    pipe = build_pipeline([draft, TableModel(target, name="target")], block_lengths=[3], on_nonfinite="warn",
                          stop_ids=[])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonFiniteWarning)
        first = [pipe.generate([0], 1, seed=s).token_list[0] for s in range(3000)]
    counts = np.bincount(first, minlength=4)
    assert stats.chisquare_pvalue(counts, target) > stats.ALPHA


# --- the wrong shape, and exceptions mid-forward ------------------------------------------------


@pytest.mark.parametrize(("fault", "shape"), [("narrow", r"\(4, 3\); expected \(4, 4\)"),
                                              ("short", r"\(3, 4\); expected \(4, 4\)")])
def test_logits_of_the_wrong_shape_are_named(fault: str, shape: str) -> None:
    target = FaultyStage(TableModel([0.1, 0.2, 0.3, 0.4], name="target"), fault, at_call=1)  # type: ignore[arg-type]
    pipe = build_pipeline([TableModel([0.25] * 4), target], block_lengths=[3])
    with pytest.raises(StageOutputError, match=rf"stage 'target' returned logits of shape {shape}: one row per "
                                               rf"position scored \(a block of 3 \+ 1\) and one column per token"):
        pipe.generate([0], 6, seed=0)


def test_an_exception_from_a_stage_keeps_its_type_and_names_the_stage() -> None:
    target = FaultyStage(TableModel([0.1, 0.2, 0.3, 0.4], name="target"), "raise-before", at_call=2)
    pipe = build_pipeline([TableModel([0.25] * 4), target], block_lengths=[2])
    with pytest.raises(InjectedFault) as info:
        pipe.generate([0, 1], 8, seed=0)
    assert any("raised by stage 'target' while scoring a context of" in note for note in info.value.__notes__)


CHAINS = [("near", "target"), ("far", "near", "target"), ("ngram", "near", "target")]
FAULTS = ["nan", "inf", "narrow", "raise-before", "raise-after"]


def stages_of(names: tuple[str, ...], models: dict[str, Any]) -> list[Any]:
    return [n if n == "ngram" else HFStage(models[n], name=n) for n in names]


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("where", [-1, -2])
@pytest.mark.parametrize("chain", CHAINS, ids="->".join)
def test_the_next_generation_after_a_fault_is_greedy_identical(
    chain: tuple[str, ...], where: int, fault: str, models: dict[str, Any], reference: list[int]
) -> None:
    """A fault at the 3rd score call of the target (where=-1) or of the stage below it (-2),
    mid-generation: the error names the stage; then the same pipeline's next generation is the
    target's HF greedy output (every KV cache consistent)."""
    stages = stages_of(chain, models)
    if isinstance(stages[where], str):
        pytest.skip("a model-free proposer has no forward to break")
    faulty = FaultyStage(stages[where], fault, at_call=3, column=5)  # type: ignore[arg-type]
    stages[where] = faulty
    n = len(stages)
    pipe = build_pipeline(stages, ["exact"] * (n - 1), [2] * (n - 2) + [3], sampling=GREEDY, stop_ids=[])
    expected_error: type[Exception] = InjectedFault if fault.startswith("raise") else StageOutputError
    with pytest.raises(expected_error, match=faulty.name if not fault.startswith("raise") else "injected fault") as info:
        pipe.generate(PROMPT, NEW)
    if fault.startswith("raise"):
        assert any(f"stage {faulty.name!r}" in note for note in info.value.__notes__)
    assert faulty.fired == 1
    assert pipe.generate(PROMPT, NEW).token_list == reference
    assert pipe.generate(PROMPT[:3], NEW).token_list == hf_greedy(models["target"], PROMPT[:3])


@pytest.mark.parametrize("who", ["near", "target"])
def test_a_fault_inside_a_decoder_layer_leaves_the_pipeline_usable(who: str, models: dict[str, Any],
                                                                   reference: list[int]) -> None:
    """The 4th forward of a decoder layer raises in the middle of the model's forward (the
    backend resets its cache); the next generation is greedy-identical."""
    stages = stages_of(("far", "near", "target"), models)
    pipe = build_pipeline(stages, ["exact", "exact"], [2, 3], sampling=GREEDY, stop_ids=[])
    layer = models[who].model.layers[1]
    with fail_module(layer, at_call=4) as seen, pytest.raises(InjectedFault):
        pipe.generate(PROMPT, NEW)
    assert seen[0] == 4
    assert pipe.generate(PROMPT, NEW).token_list == reference


@pytest.mark.parametrize("fault", ["nan", "raise-after"])
def test_a_sampled_generation_after_a_fault_is_bit_identical_to_a_fresh_pipeline(
    fault: str, models: dict[str, Any]
) -> None:
    """Sampling (temperature 1): after a fault at the target's 2nd call, the same pipeline with
    seed s emits exactly what a pipeline that never failed emits with seed s."""
    sampling = SamplingConfig(temperature=1.0)
    faulty = FaultyStage(HFStage(models["target"], name="target"), fault, at_call=2)  # type: ignore[arg-type]
    pipe = build_pipeline([HFStage(models["near"], name="near"), faulty], ["exact"], [3], sampling=sampling,
                          stop_ids=[])
    fresh = build_pipeline([HFStage(models["near"], name="near"), HFStage(models["target"], name="target")],
                           ["exact"], [3], sampling=sampling, stop_ids=[])
    with pytest.raises((InjectedFault, NonFiniteError)):
        pipe.generate(PROMPT, NEW, seed=4)
    for seed in (4, 5):
        assert pipe.generate(PROMPT, NEW, seed=seed).token_list == fresh.generate(PROMPT, NEW, seed=seed).token_list


def test_a_tree_draft_fault_is_named_and_recovered(models: dict[str, Any], reference: list[int]) -> None:
    """The tree wrapper checks its stage's rows too; after the fault the tree pipeline is still
    greedy-identical."""
    faulty = FaultyStage(HFStage(models["near"], name="near"), "nan", at_call=2, column=9)
    pipe = build_pipeline([faulty, HFStage(models["target"], name="target")], ["exact"], [3], sampling=GREEDY,
                          stop_ids=[], tree="tree:branching=3-2-1")
    with pytest.raises(NonFiniteError, match=r"stage 'near' returned the logit nan for token id 9 at position \d+ "
                                             r"\(row \d+ of the \d+ rows of this tree forward"):
        pipe.generate(PROMPT, NEW)
    assert pipe.generate(PROMPT, NEW).token_list == reference
