"""Bad input is refused where it enters, with a message naming the culprit and what would be
valid: block lengths that cannot take effect (pipeline, latency model, planner, presets, chains),
prompts, the context limit, stage wrappers and devices -- all before any work or loading."""

from __future__ import annotations

import random
import types
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import stats  # noqa: F401  (one torch thread)
import torch

from pyramid_core import (
    Block,
    ConfigError,
    Pipeline,
    PipelineSpec,
    PluginError,
    PolicyOutputError,
    Rng,
    SamplingConfig,
    Verdict,
    build_pipeline,
    make_stage,
)
from pyramid_core.backends.hf import HFStage
from pyramid_core.hookspecs import hookimpl
from pyramid_core.lab.latency.chain import predict_chain
from pyramid_core.lab.planner import plan_chain
from pyramid_core.plugins import registries, registries_with
from pyramid_core.testing import TableModel
from pyramid_core.validate import (
    EmittedMass,
    check_block_lengths,
    check_verdict,
    effective_block_lengths,
)
from pyramid_plugins.exact import ExactPolicy
from pyramid_plugins.tree import TreeProposer

ROOT = Path(__file__).resolve().parents[1]
P = [0.1, 0.2, 0.3, 0.4]
Q = [0.4, 0.3, 0.2, 0.1]


def plugin_module(name: str, **hooks: Any) -> types.ModuleType:
    """A plugin object as pluggy sees a module: named functions marked ``@hookimpl``."""
    mod = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(mod, hook, hookimpl(fn))
    return mod


def tables(n: int, vocab: int = 4) -> list[TableModel]:
    return [TableModel([1.0 / vocab] * vocab, name=f"M{i + 1}") for i in range(n)]


# --- item 2: block lengths that cannot take effect ------------------------------------------------

CAPPED = [((3, 2, 4, 1), 1, "3", "2", "1,1,1,1"), ((3, 1), 1, "3", "1", "1,1"), ((1, 4, 2), 2, "4", "2", "1,2,2")]


@pytest.mark.parametrize(("lengths", "boundary", "low", "high", "runs"), CAPPED)
def test_a_lower_length_larger_than_the_one_above_is_refused_everywhere(
    lengths: tuple[int, ...], boundary: int, low: str, high: str, runs: str
) -> None:
    """Stage k+1 is asked for at most ell_{k+1} tokens per round, so ell_k > ell_{k+1} could
    never take effect (3,2,4,1 ran bit-identically to 1,1,1,1). The pipeline, the builder (before
    loading anything), the latency model and the CLI's spec all refuse it, naming the boundary,
    both lengths and the lengths that would run."""
    n = len(lengths) + 1
    message = (rf"block lengths {','.join(map(str, lengths))}: the length {low} at boundary {boundary} -> "
               rf"{boundary + 1} cannot take effect: stage {boundary + 1} is asked for at most {high} token\(s\) "
               rf"per round .* use {runs} \(what would run\) or raise the length above to at least {low}")
    with pytest.raises(ConfigError, match=message):
        Pipeline(tables(n), [ExactPolicy()] * (n - 1), list(lengths))
    with pytest.raises(ConfigError, match=message):
        build_pipeline(tables(n), block_lengths=list(lengths))
    with pytest.raises(ConfigError, match=message):  # nothing loaded: the specs do not exist
        PipelineSpec(tuple(f"hf:path=/nonexistent/{i}" for i in range(n)), block_lengths=lengths).resolve()
    with pytest.raises(ConfigError, match=message):
        predict_chain([0.5] * (n - 1), list(lengths), [0.01] * n)
    with pytest.raises(ConfigError, match=message):
        predict_chain([0.5] * (n - 1), list(lengths), [0.01] * n, new_tokens=8)
    assert effective_block_lengths(lengths) == [int(x) for x in runs.split(",")]


@pytest.mark.parametrize("lengths", [(1, 3), (2, 3), (2, 2, 5), (4, 4, 4)])
def test_every_length_takes_effect(lengths: tuple[int, ...]) -> None:
    """Non-decreasing lengths mean what they say: after a few generations the longest block
    seen at each boundary is exactly its length (identical tables accept every token)."""
    n = len(lengths) + 1
    pipe = build_pipeline([TableModel(P, name=f"M{i}") for i in range(n)], block_lengths=list(lengths))
    longest = [0] * len(lengths)
    for seed in range(5):
        for k, b in enumerate(pipe.generate([0], 20, seed=seed).metrics.boundaries):
            longest[k] = max(longest[k], len(b.proposed_at))
    assert longest == list(lengths)


def test_lengths_are_checked_before_their_values_are_compared() -> None:
    with pytest.raises(ConfigError, match=r"block length at boundary 2 -> 3 must be an integer >= 1, got 0"):
        check_block_lengths([3, 0])
    with pytest.raises(ConfigError, match=r"boundary 1 -> 2 must be an integer >= 1, got True"):
        check_block_lengths([True, 2])
    assert check_block_lengths([1, 1, 7]) == [1, 1, 7]


@pytest.mark.parametrize("seed", range(6))
def test_the_planner_only_ranks_chains_whose_lengths_take_effect(seed: int) -> None:
    """Every ranked chain has non-decreasing lengths, and the latency model accepts them (it
    would refuse a capped length)."""
    rng = random.Random(seed)
    n = 4
    names = ["a", "b", "c", "target"]
    times = [0.001, 0.004, 0.015, 0.05]
    alpha = [[1.0 if i == j else rng.uniform(0.2, 0.95) for j in range(n)] for i in range(n)]
    plan = plan_chain(names, times, alpha, max_length=8, top=None)
    assert any(len(c.names) == 4 for c in plan.ranked)
    for c in plan.ranked:
        assert list(c.block_lengths) == sorted(c.block_lengths), c
        assert c.prediction().time_per_token == pytest.approx(c.time_per_token, rel=1e-12)


def test_the_planner_no_longer_picks_a_capped_lower_length() -> None:
    """A cheap draft that agrees well with a qualifier that agrees poorly with the target: the
    unconstrained optimum drafted a long lower block under a short upper one (a length that
    never takes effect); the plan now stays within the rule and is the best such chain."""
    names, times = ["draft", "qualifier", "target"], [0.001, 0.01, 0.1]
    alpha = [[1.0, 0.95, 0.3], [0.0, 1.0, 0.4], [0.0, 0.0, 1.0]]
    plan = plan_chain(names, times, alpha, max_length=8, top=None)
    three = next(c for c in plan.ranked if len(c.names) == 3)
    lower, upper = three.block_lengths
    assert lower <= upper
    best = min(
        (predict_chain([0.95, 0.4], [a, b], times).time_per_token, (a, b))
        for a in range(1, 9) for b in range(a, 9)
    )
    assert three.block_lengths == best[1]
    assert three.time_per_token == pytest.approx(best[0], rel=1e-12)


def test_every_preset_and_chain_has_lengths_that_take_effect() -> None:
    """The built-in presets (for every number of stages they accept) and the default chains,
    the smollm2 family included (it shipped 3,1: what ran was 1,1)."""
    regs = registries()
    checked = 0
    for entry in regs.presets:
        for n in range(2, 7):
            try:
                preset = entry.factory(n)
            except ValueError:
                continue
            check_block_lengths(preset.block_lengths)
            checked += 1
    for entry in regs.chains:
        check_block_lengths(entry.factory().block_lengths)
        checked += 1
    assert checked >= 5


# --- item 5: prompts and the context limit -------------------------------------------------------


@pytest.mark.parametrize(("prompt", "message"), [
    ([99], r"token id 99 at position 0, outside the vocabulary \(valid ids: 0 \.\. 63\)"),
    ([5, 7, -1], r"token id -1 at position 2, outside the vocabulary"),
    (torch.tensor([1, 64]), r"token id 64 at position 1"),
    ([[1, 2], [3, 4]], r"flat sequence of integer token ids; position 0 holds a nested sequence"),
    (torch.tensor([[1, 2], [3, 4]]), r"one sequence of token ids \(a 1-D tensor\), got shape \(2, 2\)"),
    ([1.7, 2.0], r"position 0 holds 1\.7 \(float\)"),
    (torch.tensor([1.5, 2.0]), r"must hold integer token ids, got dtype torch\.float32"),
    ([True], r"position 0 holds True \(bool\)"),
    ([], r"the prompt is empty"),
])
def test_bad_prompts_are_refused_at_the_entry(prompt: Any, message: str) -> None:
    """Before: ids outside the vocabulary raised IndexError deep inside a stage, a 2-D prompt was
    flattened into one sequence and a float prompt truncated, silently."""
    pipe = build_pipeline(tables(2, 64), block_lengths=[2])
    with pytest.raises(ConfigError, match=message):
        pipe.generate(prompt, 3, seed=0)


@pytest.mark.parametrize("prompt", [[1, 2, 3], (1, 2, 3), np.array([1, 2, 3]).tolist(), list(np.array([1, 2, 3])),
                                    torch.tensor([1, 2, 3], dtype=torch.int32)])
def test_integer_prompts_of_any_kind_run(prompt: Any) -> None:
    pipe = build_pipeline(tables(2, 64), block_lengths=[2])
    assert pipe.generate(prompt, 3, seed=0).token_list == pipe.generate([1, 2, 3], 3, seed=0).token_list


def tiny_gpt2(positions: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=positions, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config).eval()


def tiny_llama_positions(positions: int, seed: int = 0) -> Any:
    from pyramid_core.backends.hf.tiny import tiny_llama

    model = tiny_llama(seed)
    model.config.max_position_embeddings = positions  # what HFStage reads (RoPE keeps going past it)
    return model


def test_generation_that_cannot_fit_the_context_is_refused_up_front() -> None:
    """GPT-2 crashed after the work (position embeddings run out); RoPE models went on silently
    past max_position_embeddings. Now prompt + max_new_tokens must fit every stage's context
    length, checked before anything runs; what fits still runs."""
    for model in (tiny_gpt2(16), tiny_llama_positions(16)):
        stage = HFStage(model, name="tiny")
        assert stage.context_length == 16
        pipe = build_pipeline([stage], sampling=SamplingConfig.greedy(), stop_ids=[])
        with pytest.raises(ConfigError, match=r"the prompt \(4 tokens\) \+ max_new_tokens \(13\) = 17 tokens do not "
                                              r"fit stage 'tiny', whose context length is 16 tokens; use "
                                              r"max_new_tokens <= 12"):
            pipe.generate([1, 2, 3, 4], 13)
        with pytest.raises(ConfigError, match=r"shorten the prompt to fewer than 16 tokens"):
            pipe.generate(list(range(16)), 1)
        assert len(pipe.generate([1, 2, 3, 4], 12).token_list) == 12


def test_the_smallest_context_of_any_stage_is_the_limit() -> None:
    """A draft (or the model under a tree wrapper) with a shorter context than the target is
    named, not the target."""
    short, long = HFStage(tiny_llama_positions(10, 1), name="short draft"), HFStage(tiny_llama_positions(64), name="target")
    with pytest.raises(ConfigError, match=r"do not fit stage 'short draft', whose context length is 10 tokens"):
        build_pipeline([short, long], block_lengths=[3], stop_ids=[]).generate([1, 2, 3], 8)
    tree = build_pipeline([short, long], block_lengths=[3], stop_ids=[], tree="tree:branching=2")
    assert isinstance(tree.stages[0], TreeProposer) and tree.stages[0].context_length == 10
    with pytest.raises(ConfigError, match=r"context length is 10 tokens"):
        tree.generate([1, 2, 3], 8)


# --- items 6 and 7: wrappers, trees and devices --------------------------------------------------


@pytest.mark.parametrize("branching", ["-1", "4--2", "4-2-", "4-x", "0"])
def test_a_branching_that_is_not_a_list_of_positive_integers_is_refused(branching: str) -> None:
    """``branching=-1`` and ``4--2`` were read as 1 and 4-2."""
    with pytest.raises(ConfigError, match=rf"branching '{branching}' is not a list of integers >= 1|branching must be"):
        build_pipeline([TableModel(Q), TableModel(P)], tree=f"tree:branching={branching}")


def test_a_tree_into_a_chain_policy_is_refused_before_loading() -> None:
    """Before: the first verification raised ValueError (a traceback from ``pyramid check``)."""
    for policy in ("fuzzy", "block", "assisted", "fuzzy:div=tv,tau=0.3"):
        with pytest.raises(ConfigError, match=rf"tree='tree' drafts token trees at boundary 1 -> 2, but its policy "
                                              rf"'{policy}' verifies chains only; use a policy that verifies trees "
                                              rf"there \(exact, traversal\)"):
            PipelineSpec(("hf:path=/nonexistent", "hf:path=/nonexistent"), policies=(policy,), tree="tree").resolve()
    assert len(build_pipeline([TableModel(Q), TableModel(P)], ["traversal"], [2], tree="tree").generate([0], 4).tokens)


def test_a_stage_given_as_the_tree_is_named_as_a_stage() -> None:
    with pytest.raises(PluginError, match=r"unknown wrapper 'ngram' \(available: tree\): 'ngram' is a proposer, a "
                                          r"stage of its own -- give it as a stage \(--stage ngram\), not as the tree"):
        PipelineSpec(("hf:path=/nonexistent", "hf:path=/nonexistent"), tree="ngram").resolve()
    with pytest.raises(PluginError, match=r"unknown wrapper 'tre'; did you mean 'tree'\?"):
        PipelineSpec(("hf:path=/nonexistent", "hf:path=/nonexistent"), tree="tre").resolve()


def test_a_tree_above_the_bottom_stage_is_refused_saying_only_the_bottom_drafts_trees() -> None:
    """Before: the error called the tree wrapper "a model-free proposer"."""
    with pytest.raises(ConfigError) as info:
        Pipeline([TableModel(Q), TreeProposer(TableModel(P)), TableModel(P)], [ExactPolicy(), ExactPolicy()], [1, 1])
    text = str(info.value)
    assert "must be a model Stage (stage 2 verifies the stage below it" in text
    assert "a token-tree wrapper around a model -- can only be the first stage" in text
    assert "Only the bottom stage drafts token trees: wrap stage 1 (tree=NAME[:k=v,...] / --tree NAME[:k=v,...])" in text


def test_the_docs_state_the_tree_limit() -> None:
    text = (ROOT / "docs" / "algorithms.md").read_text()
    assert "works at any boundary" not in text
    assert "Only the bottom stage drafts a token tree" in text


@pytest.mark.parametrize("device", ["cuda:97", "nonsense-device"])
def test_an_unusable_device_is_refused_before_loading(device: str) -> None:
    """Before: ``--device cuda`` on a CPU-only torch ended in an AssertionError from inside the
    model load."""
    with pytest.raises(ConfigError, match=rf"device '{device}' is not usable here \(.*\); usable: cpu"):
        make_stage("hf:path=/nonexistent", device=device)
    with pytest.raises(ConfigError, match=rf"device '{device}' is not usable here"):
        make_stage(f"hf:path=/nonexistent,device={device}")


# --- numbers at the edges: tiny temperatures, seeds, stop ids -------------------------------------


def test_a_tiny_temperature_runs_as_greedy_through_a_pipeline() -> None:
    """Before: temperature 1e-40 crashed with IndexError in the sampler (NaN rows)."""
    from pyramid_core.testing.exactness import run_check

    dists = [[0.5, 0.5], [0.2, 0.8]]
    tiny = run_check(dists, None, [1], samples=50, seed=0, sampling=SamplingConfig(temperature=1e-40))
    greedy = run_check(dists, None, [1], samples=50, seed=0, sampling=SamplingConfig.greedy())
    assert tiny.counts == greedy.counts == [0, 50]
    pipe = build_pipeline(tables(2, 64), block_lengths=[2], sampling=SamplingConfig(temperature=1e-40))
    assert pipe.generate([1, 2], 5, seed=0).token_list == [0] * 5  # uniform rows: the first index


@pytest.mark.parametrize(("seed", "message"), [
    (2**70, r"seed must be an integer in \[0, 2\*\*63\), got 1180591620717411303424$"),
    (2**63, r"got 9223372036854775808$"),
    (-1, r"got -1$"),
    (1.5, r"got 1\.5 \(float\)"),
    ("a", r"got 'a' \(str\)"),
    (True, r"got True \(bool\)"),
])
def test_a_seed_outside_the_range_or_not_an_integer_is_refused(seed: Any, message: str) -> None:
    """Before: 2**70 overflowed inside torch (a traceback), 1.5 silently ran as seed 1, "a" was a
    raw ValueError."""
    from pyramid_core.rng import Rng

    pipe = build_pipeline(tables(2, 64), block_lengths=[2])
    with pytest.raises(ConfigError, match=message):
        pipe.generate([1], 3, seed=seed)
    with pytest.raises(ConfigError, match=message):
        Rng(seed)


def test_the_largest_seed_and_integer_seeds_of_any_kind_run() -> None:
    pipe = build_pipeline(tables(2, 64), block_lengths=[2])
    assert len(pipe.generate([1], 3, seed=2**63 - 1).token_list) == 3
    assert pipe.generate([1], 3, seed=np.int64(7)).token_list == pipe.generate([1], 3, seed=7).token_list


def test_stop_ids_outside_the_vocabulary_are_refused() -> None:
    """Before: stop id 64 of a 64-token vocabulary was accepted and could never stop anything."""
    with pytest.raises(ConfigError, match=r"stop_ids holds 64, outside the vocabulary of the stages "
                                          r"\(valid ids: 0 \.\. 63\); it could never stop a generation"):
        build_pipeline(tables(2, 64), block_lengths=[2], stop_ids=[3, 64])
    with pytest.raises(ConfigError, match=r"stop_ids holds 99"):
        Pipeline(tables(1, 64), stop_ids=[99])
    assert Pipeline(tables(1, 64), stop_ids=[63]).decode.stop_ids == (63,)


# ----------------------------------------------------------------------------------------------
# verdicts: checked where a policy's decide() result enters the recursion
# ----------------------------------------------------------------------------------------------


@attrs.frozen
class Returns:
    """A policy whose verdict is ``make(block, p)``."""

    make: Any

    def decide(self, block: Block, p: torch.Tensor, rng: Rng) -> Any:
        return self.make(block, p)


@pytest.mark.parametrize(
    ("make", "rule", "words"),
    [
        (lambda b, p: Verdict((), 99, p[0]), "token-range", "token=99, outside the vocabulary [0, 4)"),
        (lambda b, p: Verdict((), -3, p[0]), "token-range", "token=-3, outside the vocabulary [0, 4)"),
        (lambda b, p: Verdict((), 1.5, p[0]), "token-range", "token=1.5, not an integer token id"),
        (lambda b, p: Verdict(tuple(range(len(b) + 2)), 0, p[0]), "prefix",
         "accepted=(0, 1, 2, 3, 4) for a chain of 3 tokens; it must be (0, 1, ..., j-1) for some 0 <= j <= 3"),
        (lambda b, p: Verdict((1,), 0, p[0]), "prefix", "accepted=(1,) for a chain of 3 tokens"),
        (lambda b, p: Verdict(None, 0, p[0]), "prefix", "accepted=None, not a sequence of integer indices"),
        (lambda b, p: None, "verdict", "NoneType (None) from decide(), not a pyramid_core.Verdict"),
        (lambda b, p: ((), 0, p[0]), "verdict", "tuple"),
        (lambda b, p: Verdict((), 0, p), "row", "a row of shape (4, 4); the row must be a Float[Tensor, 'vocab'] of size 4"),
        (lambda b, p: Verdict((), 0, p[0, :3]), "row", "of size 4"),
        (lambda b, p: Verdict((), 1, torch.tensor([0.5, 0.0, 0.5, 0.0])), "token-mass",
         "token=1, which has probability 0 in the row it returned"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_bad_verdict_is_refused_naming_policy_boundary_and_what_is_valid(make: Any, rule: str, words: str) -> None:
    """Before: token 99 was emitted as is, -3 counted as a token, the rest ended in IndexError or
    AttributeError deep in the pipeline."""
    pipe = Pipeline(tables(3), [ExactPolicy(), Returns(make)], [3, 3])
    with pytest.raises(PolicyOutputError) as info:
        pipe.generate([0], 5, seed=0)
    assert info.value.rule == rule
    message = str(info.value)
    assert message.startswith("policy Returns(make=<function") and " at boundary 2 -> 3 returned " in message
    assert words in message, message


def test_a_bad_verdict_names_the_registered_policy_and_its_plugin() -> None:
    def register_policies(register: Any) -> None:
        register("ninety-nine", lambda: Returns(lambda b, p: Verdict((), 99, p[0])))

    regs = registries_with(plugin_module("bad_verdicts", register_policies=register_policies))
    pipe = build_pipeline(tables(2), ["ninety-nine"], [2], regs=regs)
    with pytest.raises(PolicyOutputError, match=r"^policy 'ninety-nine' \(from plugin 'bad_verdicts'\) at boundary "
                                                 r"1 -> 2 returned token=99, outside the vocabulary \[0, 4\)"):
        pipe.generate([0], 5, seed=0)


def test_a_tree_verdict_must_be_a_root_path() -> None:
    block = Block(torch.tensor([1, 2, 3]), torch.full((3, 4), 0.25), torch.tensor([-1, -1, 0]))
    p = torch.full((4, 4), 0.25)
    assert check_verdict(Verdict((0, 2), 1, p[3]), block, 4, policy="x") == ((0, 2), 1)
    assert check_verdict(Verdict((1,), 1, p[2]), block, 4, policy="x") == ((1,), 1)
    with pytest.raises(PolicyOutputError, match=r"policy x at boundary 1 -> 2 returned accepted=\(1, 2\), not a "
                                                r"root-to-node path of the tree with parents \[-1, -1, 0\]: node 2 does "
                                                r"not hang below node 1"):
        check_verdict(Verdict((1, 2), 1, p[3]), block, 4, policy="x", boundary="1 -> 2")
    with pytest.raises(PolicyOutputError, match=r"node 2 does not hang below the context"):
        check_verdict(Verdict((2,), 1, p[3]), block, 4, policy="x")


def test_emitted_mass_on_an_accelerator_is_checked_once_at_the_end() -> None:
    """The deferred path (rows on an accelerator) exercised on the CPU: nothing is read per
    round, one read at ``flush`` names the first bad round's policy, boundary and token."""
    masses = EmittedMass(defer=True)
    row = torch.tensor([0.5, 0.0, 0.5, 0.0])
    masses.check(row, 0, policy="a", boundary="1 -> 2")
    masses.check(row, 3, policy="b", boundary="2 -> 3")
    masses.check(row, 1, policy="c", boundary="1 -> 2")
    row.zero_()  # the copies are values, not views of the row
    with pytest.raises(PolicyOutputError, match=r"^policy b at boundary 2 -> 3 returned token=3, which has "
                                                r"probability 0 in the row it returned"):
        masses.flush()
    masses.flush()  # forgotten after the read
    masses.check(torch.tensor([1.0, 0.0]), 0, policy="a", boundary="1 -> 2")
    masses.flush()


def test_valid_verdicts_pass_and_tokens_are_unchanged() -> None:
    pipe = Pipeline(tables(3), [ExactPolicy(), ExactPolicy()], [3, 3])
    a = pipe.generate([0], 40, seed=3).token_list
    assert len(a) == 40 and all(0 <= t < 4 for t in a)
