"""The T(M) cost model (``ForwardCost``) and ``predict_chain`` with non-flat costs: hand values,
the flat case equal to the old model, validation, and the finite horizon against an exhaustive
enumeration of every acceptance outcome of the real ``Pipeline`` with stages that feed tokens by
``HFStage``'s cache rule (checked against ``HFStage`` itself on tiny random models)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from pyramid_core.backends.hf import HFStage
from pyramid_core.errors import ConfigError
from pyramid_core.lab.latency.chain import predict_chain
from pyramid_core.lab.latency.cost import ForwardCost, as_forward_cost
from pyramid_core.lab.latency.forms import expected_tokens
from pyramid_core.pipeline import Pipeline
from pyramid_core.rng import Rng
from pyramid_core.testing import TableModel
from pyramid_core.types import Block, Verdict
from pyramid_plugins.exact import ExactPolicy

# the CPU profile of docs/algorithms.md (SmolLM2-135M, ms per forward), in seconds
CPU = ForwardCost.from_table({1: 0.071, 2: 0.115, 3: 0.142, 5: 0.098}, name="smollm2")

# --- ForwardCost ---------------------------------------------------------------------------------


def test_interpolation_and_extrapolation_by_hand() -> None:
    assert [CPU(m) for m in (1, 2, 3, 5)] == [0.071, 0.115, 0.142, 0.098]
    assert CPU(4) == pytest.approx(0.120)  # halfway between M = 3 and M = 5
    assert CPU(9) == pytest.approx(0.098)  # the last segment falls: flat beyond it
    rising = ForwardCost.from_table({4: 2.0, 2: 1.0}, name="rising")  # any key order
    assert rising.points == ((2, 1.0), (4, 2.0))
    assert rising(1) == 1.0  # flat below the first point
    assert rising(3) == pytest.approx(1.5) and rising(8) == pytest.approx(4.0)  # slope 0.5 beyond
    flat = ForwardCost.flat(0.25, name="gpu")
    assert [flat(m) for m in (1, 2, 17)] == [0.25] * 3 and flat.is_flat and flat.decode == 0.25
    assert not CPU.is_flat and ForwardCost(((1, 2.0), (4, 2.0))).is_flat
    assert CPU.format_ms() == "1: 71.0, 2: 115.0, 3: 142.0, 5: 98.0"
    assert CPU.as_list() == [[1, 0.071], [2, 0.115], [3, 0.142], [5, 0.098]]
    assert as_forward_cost(0.5, "stage 1") == ForwardCost.flat(0.5, "stage 1")
    assert as_forward_cost(CPU, "stage 2") is CPU


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ((), r"forward cost of draft: no measured points"),
        (((1, 0.1), (1, 0.2)), r"forward cost of draft: M must be strictly increasing, got M = 1 after M = 1"),
        (((2, 0.1), (1, 0.2)), r"M must be strictly increasing, got M = 1 after M = 2"),
        (((0, 0.1),), r"forward cost of draft: M \(tokens fed by one forward\) must be an integer >= 1, got 0"),
        (((1.5, 0.1),), r"must be an integer >= 1, got 1\.5"),
        (((1, -0.1),), r"forward cost of draft: T\(M=1\) must be a finite number of seconds >= 0, got -0\.1"),
        (((1, 0.1), (2, math.nan)), r"T\(M=2\) must be a finite number of seconds >= 0, got nan"),
        (((1, math.inf),), r"T\(M=1\) .* got inf"),
        (((1, "fast"),), r"T\(M=1\) .* got 'fast'"),
        (((1, 0.1, 3),), r"each point must be an \(M, seconds\) pair"),
    ],
)
def test_cost_errors_name_the_stage_and_value(points: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ForwardCost(points, name="draft")


def test_predict_chain_errors_name_the_stage() -> None:
    with pytest.raises(ConfigError, match=r"forward time of stage 2 must be .* got -1\.0"):
        predict_chain([0.5], [2], [0.1, -1.0])
    with pytest.raises(ConfigError, match=r"forward time of stage 1 .* got nan"):
        predict_chain([0.5], [2], [math.nan, CPU])
    with pytest.raises(ConfigError, match=r"smollm2: a forward feeds an integer M >= 1 tokens, got 0"):
        CPU(0)


# --- predict_chain with T(M) ----------------------------------------------------------------------


def test_steady_state_charges_the_verification_at_ell_plus_one() -> None:
    # draft 10 ms flat, target CPU, alpha 0.6: tau(ell) = (0.010 ell + T_t(ell + 1)) / E(0.6, ell)
    for ell, t_verify in [(1, 0.115), (2, 0.142), (3, 0.120), (4, 0.098), (6, 0.098)]:
        pred = predict_chain([0.6], [ell], [0.010, CPU])
        assert pred.time_per_token == pytest.approx((0.010 * ell + t_verify) / expected_tokens(0.6, ell))
        assert pred.speedup == pytest.approx(0.071 / pred.time_per_token)  # over T_target(1)
    # three stages: tau_2 = (2 * T_1(1) + T_2(3)) / E_2, tau_3 = (3 tau_2 + T_3(4)) / E_3
    t1, t2 = ForwardCost.from_table({1: 1.0, 2: 5.0}), ForwardCost.from_table({1: 2.0, 3: 4.0})
    t3 = ForwardCost.from_table({1: 10.0, 4: 16.0})
    tau_2 = (2 * 1.0 + 4.0) / expected_tokens(0.5, 2)
    pred = predict_chain([0.5, 0.8], [2, 3], [t1, t2, t3])
    assert pred.time_per_token == pytest.approx((3 * tau_2 + 16.0) / expected_tokens(0.8, 3))
    assert pred.target_time_per_token == 10.0


@pytest.mark.parametrize("new_tokens", [None, 1, 7, 40])
def test_flat_costs_are_the_old_model(new_tokens: int | None) -> None:
    alphas, lengths, times = [0.6, 0.3, 0.9], [1, 3, 5], [0.0, 0.01, 0.1, 1.0]
    floats = predict_chain(alphas, lengths, times, new_tokens=new_tokens)
    costs = predict_chain(alphas, lengths, [ForwardCost.flat(t) for t in times], new_tokens=new_tokens)
    # several points, all equal, are flat too
    same = predict_chain(alphas, lengths, [ForwardCost(((1, t), (4, t))) for t in times], new_tokens=new_tokens)
    for pred in (costs, same):
        assert pred.time_per_token == pytest.approx(floats.time_per_token, rel=1e-12)
        assert pred.forwards_per_token == pytest.approx(floats.forwards_per_token, rel=1e-12)
        assert pred.target_time_per_token == floats.target_time_per_token


def test_finite_horizon_two_stages_by_hand() -> None:
    """Draft T_d(1) = 1, T_d(2) = 3; target T_t(2) = 20, T_t(3) = 40; alpha = 1/2.

    ell = 2, n = 3. Each round: the draft drafts min(2, need) tokens at M = 1 each (the token
    emitted last by the target is its only unfed one: no block was ever fully accepted before a
    new round), the target verifies at M = block + 1.
      round 1: 1 + 1 + 40 = 42, then a = 0 (1/2): need 2; a = 1 (1/4): need 1; a = 2: done.
      need 2:  42, then a = 0 (1/2): need 1; a = 1: done; a = 2: done (the bonus is cut).
      need 1:  1 + 20 = 21.
    E[time] = 42 + 1/2 (42 + 1/2 21) + 1/4 21 = 73.5."""
    draft = ForwardCost.from_table({1: 1.0, 2: 3.0}, name="draft")
    target = ForwardCost.from_table({1: 10.0, 2: 20.0, 3: 40.0}, name="target")
    pred = predict_chain([0.5], [2], [draft, target], new_tokens=3)
    assert pred.time_per_token * 3 == pytest.approx(73.5)
    # ell = 1: a fully accepted block leaves the drafted token unfed by the draft, so its next
    # step feeds it and the bonus: M = 2 (3 s). n = 2: round 1 (1 + 20), then a = 0 (1/2):
    # need 1 (1 + 20); a = 1: done. n = 3: after a = 0 (1/2) the n = 2 case again (21 + 1/2 21);
    # after a = 1 (1/2), need 1 with the draft's M = 2: 3 + 20.
    assert predict_chain([0.5], [1], [draft, target], new_tokens=2).time_per_token * 2 == pytest.approx(21 + 0.5 * 21)
    three = 21 + 0.5 * (21 + 0.5 * 21) + 0.5 * (3 + 20)
    assert predict_chain([0.5], [1], [draft, target], new_tokens=3).time_per_token * 3 == pytest.approx(three)


# --- the finite horizon against every outcome of the real pipeline --------------------------------

V = 8


class CachedTable(TableModel):
    """A uniform table stage that feeds tokens like ``HFStage``: it remembers the ids its cache
    holds, keeps the longest prefix shared with the full context + block short of the last
    context token, and "feeds" the rest, charging T(M) for the M tokens fed. The prompt but its
    last token starts cached (the model's prefill-excluded start)."""

    def __init__(self, name: str, cost: ForwardCost, prompt: list[int]) -> None:
        super().__init__([1.0 / V] * V, name=name)
        self.cost, self.prompt = cost, prompt
        self.reset()

    def reset(self) -> None:
        self.ids: list[int] = self.prompt[:-1]
        self.fed: list[int] = []

    def score(self, context: torch.Tensor, block: Block | None = None) -> torch.Tensor:
        full = context.tolist() + ([] if block is None else block.tokens.tolist())
        keep = 0
        while keep < min(len(self.ids), len(full)) and self.ids[keep] == full[keep]:
            keep += 1
        keep = min(keep, len(context) - 1)
        self.fed.append(len(full) - keep)
        self.ids = full
        return super().score(context, block)

    @property
    def seconds(self) -> float:
        return sum(self.cost(m) for m in self.fed)


class Script:
    """The acceptance decisions of one run: a fixed prefix, then always the first option;
    records every decision (choice, options) and the run's probability."""

    def __init__(self, prefix: list[int]) -> None:
        self.prefix = prefix
        self.taken: list[tuple[int, int]] = []
        self.prob = 1.0

    def choose(self, pmf: list[float]) -> int:
        d = len(self.taken)
        choice = self.prefix[d] if d < len(self.prefix) else 0
        self.taken.append((choice, len(pmf)))
        self.prob *= pmf[choice]
        return choice


class ScriptedPolicy:
    """Accepts the scripted prefix length a of the block (each with probability alpha,
    i.i.d.); the emitted token differs from the rejected one, as under exact sampling."""

    def __init__(self, alpha: float, script: Callable[[], Script]) -> None:
        self.alpha, self.script = alpha, script

    def decide(self, block: Block, p: torch.Tensor, rng: Rng) -> Verdict:
        m = len(block)
        a = self.script().choose([self.alpha**j * (1 - self.alpha) for j in range(m)] + [self.alpha**m])
        tokens = block.tokens.tolist()
        y = (tokens[a] + 1) % V if a < m else 0
        return Verdict(tuple(range(a)), y, p[a])


def every_outcome(run: Callable[[Script], Any]) -> Iterator[tuple[float, Any]]:
    """(probability, result) of every sequence of acceptance decisions (depth-first)."""
    prefix: list[int] = []
    while True:
        script = Script(prefix)
        result = run(script)
        yield script.prob, result
        i = len(script.taken) - 1
        while i >= 0 and script.taken[i][0] == script.taken[i][1] - 1:
            i -= 1
        if i < 0:
            return
        prefix = [c for c, _ in script.taken[:i]] + [script.taken[i][0] + 1]


COSTS = [
    ForwardCost.from_table({1: 1.0, 2: 2.7, 3: 3.1, 4: 1.9}, name="s1"),
    ForwardCost.from_table({1: 5.0, 2: 7.5, 3: 13.0, 4: 9.0, 5: 11.0}, name="s2"),
    ForwardCost.from_table({1: 20.0, 2: 45.0, 3: 33.0, 4: 61.0}, name="s3"),
    ForwardCost.from_table({1: 70.0, 2: 115.0, 3: 142.0, 5: 98.0}, name="s4"),
]


@pytest.mark.parametrize(
    ("alphas", "lengths", "new_tokens"),
    [([0.6], [3], 8), ([0.5], [1], 6), ([0.7, 0.4], [2, 2], 4), ([0.7, 0.4], [1, 2], 5),
     ([0.8, 0.5, 0.6], [1, 1, 2], 3)],
)
def test_finite_horizon_is_the_expectation_over_every_outcome(
    alphas: list[float], lengths: list[int], new_tokens: int
) -> None:
    """Exhaustive, no sampling (21 to ~1100 runs): every sequence of acceptance lengths of the real pipeline (with
    its budget rule), weighted by its i.i.d. probability; times from the M each stage fed."""
    n = len(alphas) + 1
    costs = COSTS[:n - 1] + [COSTS[-1]]
    prompt = [1, 2, 3]
    script: list[Script] = []
    stages = [CachedTable(f"s{k + 1}", costs[k], prompt) for k in range(n)]
    policies = [ScriptedPolicy(a, lambda: script[0]) for a in alphas]
    pipe = Pipeline(stages, policies, lengths)

    def run(s: Script) -> tuple[float, list[int], list[list[int]]]:
        script[:] = [s]
        tokens = pipe.generate(prompt, new_tokens, seed=0).tokens
        assert len(tokens) == new_tokens
        return sum(st.seconds for st in stages), [len(st.fed) for st in stages], [list(st.fed) for st in stages]

    outcomes = list(every_outcome(run))
    assert sum(p for p, _ in outcomes) == pytest.approx(1.0, rel=1e-12)
    seconds = sum(p * r[0] for p, r in outcomes)
    forwards = [sum(p * r[1][k] for p, r in outcomes) for k in range(n)]
    pred = predict_chain(alphas, lengths, costs, new_tokens=new_tokens)
    assert pred.time_per_token * new_tokens == pytest.approx(seconds, rel=1e-10)
    assert [f * new_tokens for f in pred.forwards_per_token] == pytest.approx(forwards, rel=1e-10)
    # which M occur (predict_chain's docstring): the target verifies at M = block + 1, a middle
    # stage at block + 1 or + 2, the drafter's steps feed 1 .. N tokens
    fed = [{m for _, r in outcomes for m in r[2][k]} for k in range(n)]
    assert fed[-1] <= set(range(2, lengths[-1] + 2))
    assert fed[0] <= set(range(1, n + 1)) and 2 in fed[0]
    for k in range(1, n - 1):
        assert fed[k] <= set(range(2, lengths[k - 1] + 3))


def test_feed_rule_is_hfstage(tiny_models: dict[str, Any]) -> None:
    """``CachedTable``'s count of fed tokens is what ``HFStage`` feeds its model: a 3-stage exact
    pipeline on tiny random models, every forward's input length recorded by a hook."""
    models = [tiny_models["far"], tiny_models["near"], tiny_models["target"]]
    stages = [HFStage(m, name=f"s{k}") for k, m in enumerate(models)]
    prompt = [3, 5, 7, 11, 13]
    fed: list[list[int]] = [[] for _ in stages]
    ruled: list[CachedTable] = []
    hooks = []
    for k, stage in enumerate(stages):
        hooks.append(stage.model.register_forward_pre_hook(
            lambda module, args, kwargs, k=k: fed[k].append(int(kwargs["input_ids"].shape[1])), with_kwargs=True))
        rule = CachedTable(stage.name, COSTS[k], prompt)
        rule.ids = []  # HFStage starts empty (prefill)
        ruled.append(rule)
        original = stage.score

        def score(context: torch.Tensor, block: Block | None = None, original: Any = original, rule: Any = rule) -> Any:
            rule.score(context, block)
            return original(context, block)

        stage.score = score  # type: ignore[method-assign]
    pipe = Pipeline(stages, [ExactPolicy(), ExactPolicy()], [2, 3])
    try:
        pipe.generate(prompt, 24, seed=5)
    finally:
        for hook in hooks:
            hook.remove()
    for k in range(len(stages)):
        assert fed[k] == ruled[k].fed, stages[k].name
    assert max(fed[0][1:]) > 1 and 4 in fed[-1]  # extra tokens do occur; the target verifies 3 + 1
