"""The HSD planner (docs/algorithms.md "Latency model": the best hierarchy is a shortest path over candidates
ordered by cost): the DP against brute force, hand-checkable plans, the measurements on explicit
tables and tiny random models, and ``pyramid plan`` end to end on a tiny saved model."""

from __future__ import annotations

import itertools
import json
import math
import random
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch

from pyramid_core.backends.hf import HFStage
from pyramid_core.backends.hf.tiny import save_with_words, tiny_llama
from pyramid_core.cli import build_parser, main
from pyramid_core.errors import ConfigError
from pyramid_core.lab.latency.chain import predict_chain
from pyramid_core.lab.latency.cost import ForwardCost, as_forward_cost
from pyramid_core.lab.latency.forms import expected_tokens
from pyramid_core.lab.measure import (
    alpha_for_tokens_per_forward,
    measure_pairwise_alpha,
    measure_proposer_alpha,
    measure_stage_costs,
    measure_stage_time,
)
from pyramid_core.lab.planner import plan_chain
from pyramid_core.rng import Rng
from pyramid_core.testing import TableModel
from pyramid_core.types import Block

# --- the planner against brute force -------------------------------------------------------------


Cost = float | ForwardCost


def brute_force(
    names: list[str], times: list[Cost], alpha: list[list[float]], proposers: set[str], max_length: int,
    max_stages: int,
) -> dict[tuple[str, ...], tuple[float, tuple[int, ...]]]:
    """Every chain (a proposer only first; the models before the target by strictly increasing
    T(1); the target last) x every tuple of block lengths that can take effect (non-decreasing
    from the bottom boundary up: the pipeline refuses the others), scored with
    ``predict_chain``: the best seconds per token and lengths of each chain."""
    n, target = len(names), len(names) - 1
    decode = [as_forward_cost(t, name).decode for name, t in zip(names, times)]
    out: dict[tuple[str, ...], tuple[float, tuple[int, ...]]] = {}
    for size in range(0, min(max_stages, n) - 1 + 1):
        for lower in itertools.permutations(range(n - 1), size):
            if any(names[c] in proposers for c in lower[1:]):
                continue
            models = [c for c in lower if names[c] not in proposers]
            if any(decode[a] >= decode[b] for a, b in zip(models, models[1:])):
                continue
            path = (*lower, target)
            alphas = [alpha[a][b] for a, b in zip(path, path[1:])]
            best: tuple[float, tuple[int, ...]] = (math.inf, ())
            for lengths in itertools.product(range(1, max_length + 1), repeat=len(path) - 1):
                if any(a > b for a, b in zip(lengths, lengths[1:])):
                    continue
                tau = predict_chain(alphas, list(lengths), [times[c] for c in path]).time_per_token
                if tau < best[0]:
                    best = (tau, lengths)
            out[tuple(names[c] for c in path)] = best
    return out


def random_case(seed: int, curves: bool = False) -> tuple[list[str], list[Cost], list[list[float]], set[str]]:
    """Random candidates, alpha and T per candidate; with ``curves`` every model's T is a random
    non-flat T(M) (rising, falling or both, as on a CPU) with the same T(1)."""
    rng = random.Random(seed)
    n_models = rng.randint(2, 4)
    names = [f"m{i}" for i in range(n_models)] + ["target"]
    times = [rng.uniform(0.001, 0.05) for _ in range(n_models)] + [0.05]
    if seed % 3 == 0:  # a model measured slower than the target: still only before it
        times[0] = 0.08
    proposers: set[str] = set()
    if seed % 2 == 0:  # one or two model-free proposers (T = 0)
        free = ["ngram", "lookup"][: 1 + (seed % 4 == 0)]
        names, times, proposers = [*free, *names], [0.0] * len(free) + times, set(free)
    n = len(names)
    alpha = [[1.0 if i == j else rng.choice([0.0, 1.0, rng.random(), rng.random(), rng.random()])
              for j in range(n)] for i in range(n)]
    # shuffle the non-target candidates: the planner orders them by cost itself
    perm = list(range(n - 1))
    rng.shuffle(perm)
    perm.append(n - 1)
    costs: list[Cost] = list(times)
    if curves:
        costs = [ForwardCost.from_table({1: t, **{m: t * rng.uniform(0.7, 2.5) for m in (2, 3, 5, 8)}})
                 if t > 0 else t for t in times]
    return ([names[p] for p in perm], [costs[p] for p in perm],
            [[alpha[a][b] for b in perm] for a in perm], proposers)


@pytest.mark.parametrize("curves", [False, True])
@pytest.mark.parametrize("max_stages", [None, 2, 3])
@pytest.mark.parametrize("seed", range(8))
def test_dp_equals_brute_force(seed: int, max_stages: int | None, curves: bool) -> None:
    names, times, alpha, proposers = random_case(seed, curves)
    max_length = 5
    plan = plan_chain(names, times, alpha, proposers=sorted(proposers), max_length=max_length,
                      max_stages=max_stages, top=None)
    brute = brute_force(names, times, alpha, proposers, max_length, max_stages or len(names))
    # every chain is ranked once, with the time and lengths of the exhaustive search
    assert sorted(c.names for c in plan.ranked) == sorted(brute)
    for c in plan.ranked:
        tau, lengths = brute[c.names]
        assert c.time_per_token == pytest.approx(tau, rel=1e-12)
        assert c.block_lengths == lengths
    taus = [c.time_per_token for c in plan.ranked]
    assert taus == sorted(taus)
    assert plan.time_per_token == pytest.approx(min(t for t, _ in brute.values()), rel=1e-12)
    # the top-k ranking (k-best DP, polynomial) is the head of the full ranking
    top3 = plan_chain(names, times, alpha, proposers=sorted(proposers), max_length=max_length,
                      max_stages=max_stages, top=3)
    assert [c.names for c in top3.ranked] == [c.names for c in plan.ranked[:3]]


# --- hand-checkable plans ---------------------------------------------------------------------


def test_useless_draft_is_never_chosen() -> None:
    plan = plan_chain(["useless", "target"], [0.0, 0.02], [[1.0, 0.0], [0.0, 1.0]], max_length=8)
    # alpha = 0: every block length gives tau = (ell * 0 + T) / 1 = T, a tie the target alone wins
    assert plan.chain == ("target",)
    assert plan.block_lengths == () and plan.speedup == 1.0
    assert plan.tokens_per_s == pytest.approx(50.0)
    assert [c.names for c in plan.ranked] == [("target",), ("useless", "target")]
    assert plan.ranked[1].block_lengths == (1,)  # ties between lengths go to the shortest block


def test_free_perfect_draft_gets_the_longest_block() -> None:
    alpha = [[1.0, 0.9, 1.0], [0.0, 1.0, 0.9], [0.0, 0.0, 1.0]]
    plan = plan_chain(["oracle", "mid", "target"], [0.0, 0.01, 0.1], alpha, proposers=["oracle"], max_length=7)
    assert plan.chain == ("oracle", "target")
    assert plan.block_lengths == (7,)
    assert plan.speedup == pytest.approx(8.0)  # tau = T / (L + 1)


def test_three_stages_by_hand() -> None:
    # d -> t: tau(ell) = (0.1 ell + 1) / E(0.5, ell) = 1.1 / 1.5, 1.2 / 1.75, 1.3 / 1.875: ell = 2.
    # q -> t: (0.2 ell + 1) / E(0.9, ell), best at ell = 3: 1.6 / 3.439 = 0.465.
    # d -> q -> t: tau_q = 0.4 / 2.44 (ell = 2), then (3 tau_q + 1) / 3.439 = 0.434 (ell = 3).
    names, times = ["d", "q", "t"], [0.1, 0.2, 1.0]
    alpha = [[1.0, 0.8, 0.5], [0.0, 1.0, 0.9], [0.0, 0.0, 1.0]]
    plan = plan_chain(names, times, alpha, max_length=3)
    by_chain = {c.names: c for c in plan.ranked}
    assert by_chain[("d", "t")].block_lengths == (2,)
    assert by_chain[("d", "t")].time_per_token == pytest.approx(1.2 / 1.75)
    assert by_chain[("q", "t")].block_lengths == (3,)
    assert by_chain[("q", "t")].time_per_token == pytest.approx(1.6 / expected_tokens(0.9, 3))
    tau_q = 0.4 / expected_tokens(0.8, 2)
    assert by_chain[("d", "q", "t")].block_lengths == (2, 3)
    assert by_chain[("d", "q", "t")].time_per_token == pytest.approx((3 * tau_q + 1.0) / expected_tokens(0.9, 3))
    assert plan.chain == ("d", "q", "t")
    assert plan.alphas == (0.8, 0.9)
    assert [c.names for c in plan.ranked] == [("d", "q", "t"), ("q", "t"), ("d", "t"), ("t",)]
    # at most 2 stages: the best pair
    two = plan_chain(names, times, alpha, max_length=3, max_stages=2)
    assert two.chain == ("q", "t") and all(len(c.names) <= 2 for c in two.ranked)


def test_a_proposer_only_starts_a_chain() -> None:
    # two perfect free proposers: stacking them would look free, but a proposer cannot verify
    names = ["ngram", "lookup", "target"]
    alpha = [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    plan = plan_chain(names, [0.0, 0.0, 1.0], alpha, proposers=["ngram", "lookup"], max_length=4, top=None)
    assert sorted(c.names for c in plan.ranked) == [("lookup", "target"), ("ngram", "target"), ("target",)]


# the CPU profile of docs/algorithms.md (SmolLM2-135M with a KV cache), seconds per forward
CPU = ForwardCost.from_table({1: 0.071, 2: 0.115, 3: 0.142, 5: 0.098}, name="smollm2")


def test_a_cpu_cost_curve_changes_the_block_length() -> None:
    """Draft 10 ms, alpha 0.6, target 71 ms per decode forward. Flat T: tau(ell) = (0.01 ell +
    0.071) / E(0.6, ell) = 0.0506, 0.0464, 0.0464 (ell = 3, just below ell = 2), 0.0481: ell = 3.
    With the CPU curve a verification costs T(ell + 1) = 115, 142, 120, 98, 98 ms:
    tau = 0.0781, 0.0827, 0.0689, 0.0599, 0.0621: ell = 4, where M = 5 is cheap."""
    alpha = [[1.0, 0.6], [0.0, 1.0]]
    flat = plan_chain(["draft", "target"], [0.010, 0.071], alpha, max_length=8)
    assert flat.chain == ("draft", "target") and flat.block_lengths == (3,)
    assert flat.time_per_token == pytest.approx(0.101 / expected_tokens(0.6, 3))
    curve = plan_chain(["draft", "target"], [0.010, CPU], alpha, max_length=8)
    assert curve.chain == ("draft", "target") and curve.block_lengths == (4,)
    assert curve.time_per_token == pytest.approx((0.040 + 0.098) / expected_tokens(0.6, 4))
    assert curve.speedup == pytest.approx(0.071 / curve.time_per_token)
    assert curve.forward_times == (0.010, 0.071) and curve.forward_costs[1] is CPU
    assert "1: 71.0, 2: 115.0, 3: 142.0, 5: 98.0" in curve.to_markdown()
    assert curve.as_dict()["forward_costs"][1] == CPU.as_list()


def test_a_cpu_cost_curve_can_rule_out_drafting() -> None:
    """Draft 30 ms, alpha 0.5: flat, ell = 1 gives (0.030 + 0.071) / 1.5 = 0.0673 < 0.071, a
    1.05x speedup; with the CPU curve the best block, ell = 1, costs (0.030 + 0.115) / 1.5 =
    0.0967 > 0.071 (ell = 2, 3, 4: 0.1154, 0.1120, 0.1125): the target alone is faster."""
    alpha = [[1.0, 0.5], [0.0, 1.0]]
    assert plan_chain(["draft", "target"], [0.030, 0.071], alpha, max_length=8).chain == ("draft", "target")
    curve = plan_chain(["draft", "target"], [0.030, CPU], alpha, max_length=8)
    assert curve.chain == ("target",) and curve.speedup == 1.0
    assert curve.ranked[1].block_lengths == (1,)
    assert curve.ranked[1].time_per_token == pytest.approx(0.145 / 1.5)


@pytest.mark.parametrize("curves", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_predicted_speedup_is_predict_chain(seed: int, curves: bool) -> None:
    names, times, alpha, proposers = random_case(seed, curves)
    plan = plan_chain(names, times, alpha, proposers=sorted(proposers), max_length=6, top=None)
    t_target = as_forward_cost(times[-1], "target").decode
    for c in plan.ranked:
        pred = predict_chain(list(c.alphas), list(c.block_lengths), list(c.forward_costs))
        assert c.speedup == pytest.approx(pred.speedup, rel=1e-12)
        assert c.tokens_per_s == pytest.approx(pred.tokens_per_s, rel=1e-12)
        assert c.prediction().speedup == pytest.approx(pred.speedup, rel=1e-12)
        assert c.target_time == t_target
        assert c.forward_times == tuple(f.decode for f in c.forward_costs)
    assert plan.speedup == pytest.approx(t_target / plan.time_per_token)
    assert plan.speedup >= 1.0  # the target alone is always a candidate


def test_report_and_command_line() -> None:
    alpha = [[1.0, 0.6, 0.5], [0.0, 1.0, 0.8], [0.0, 0.0, 1.0]]
    plan = plan_chain(["ngram", "hf:path=/m,num_layers=1", "hf:path=/m"], [0.0, 0.002, 0.01], alpha,
                      proposers=["ngram"], max_length=8)
    md = plan.to_markdown()
    assert "| rank | chain | lengths | alphas | predicted tok/s | predicted speedup |" in md
    assert md.count("\n| ") == 3 + 1 + len(plan.ranked)  # candidates, header, chains
    args = plan.best.generate_args()
    assert args[::2] == ["--stage"] * len(plan.chain) + ["--length"] * len(plan.block_lengths)
    ns = build_parser().parse_args(["generate", "--prompt", "hi", *args])
    assert ns.stage == list(plan.chain) and ns.length == list(plan.block_lengths)
    data = json.loads(json.dumps(plan.as_dict()))
    assert data["best"]["chain"] == list(plan.chain) and len(data["ranked"]) == len(plan.ranked)


# --- errors -------------------------------------------------------------------------------------

GOOD_ALPHA = [[1.0, 0.5], [0.5, 1.0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": []}, "at least one candidate"),
        ({"forward_times": [0.1]}, "2 candidates need 2 forward times, got 1"),
        ({"alpha": [[1.0, 0.5]]}, r"2 x 2 matrix .* got 1 rows"),
        ({"alpha": [[1.0, 0.5], [0.5]]}, r"2 x 2 matrix .* lengths \[2, 1\]"),
        ({"alpha": [[1.0, 1.5], [0.5, 1.0]]}, r"alpha\[0\]\[1\] \('d' drafting for 't'\) .* got 1\.5"),
        ({"alpha": [[1.0, -0.1], [0.5, 1.0]]}, r"alpha\[0\]\[1\] .* got -0\.1"),
        ({"alpha": [[1.0, math.nan], [0.5, 1.0]]}, r"alpha\[0\]\[1\] \('d' drafting for 't'\) is needed but NaN"),
        ({"forward_times": [-0.1, 1.0]}, r"forward time of 'd' .* got -0\.1"),
        ({"forward_times": [0.1, "fast"]}, r"forward time of 't' .* got 'fast'"),
        ({"forward_times": [0.1, 0.0]}, r"target 't' must be > 0"),
        ({"names": ["d", "d"]}, "'d' is given twice"),
        ({"proposers": ["ngarm"]}, r"proposer 'ngarm' is not a candidate; did you mean"),
        ({"proposers": ["t"]}, "target 't' .* must be a model, not a proposer"),
        ({"max_length": 0}, "max_length must be an integer >= 1, got 0"),
        ({"max_stages": 0}, "max_stages must be an integer >= 1"),
        ({"top": 0}, "top must be an integer >= 1 or None"),
    ],
)
def test_errors_name_the_culprit(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"names": ["d", "t"], "forward_times": [0.1, 1.0], "alpha": GOOD_ALPHA}
    args.update(kwargs)
    if kwargs.get("proposers") == ["ngarm"]:
        args["names"] = ["ngram", "t"]
    with pytest.raises(ConfigError, match=message):
        plan_chain(args.pop("names"), args.pop("forward_times"), args.pop("alpha"), **args)


def test_unused_alpha_entries_may_be_nan() -> None:
    # t -> d is never a boundary (the target is last), nor anything -> a proposer
    plan = plan_chain(["ngram", "d", "t"], [0.0, 0.1, 1.0],
                      [[math.nan, 0.5, 0.5], [math.nan, math.nan, 0.5], [math.nan, math.nan, math.nan]],
                      proposers=["ngram"])
    assert plan.speedup > 1


# --- measurements -------------------------------------------------------------------------------

V = 8


def successor(ctx: tuple[int, ...]) -> list[float]:
    """After token x the most likely next token is x + 1 (mod V)."""
    row = [0.5 / (V - 1)] * V
    row[(ctx[-1] + 1) % V] = 0.5
    return row


def skipper(ctx: tuple[int, ...]) -> list[float]:
    """Like ``successor`` but after a multiple of 4 it predicts x + 2: wrong 1 time in 4."""
    row = [0.5 / (V - 1)] * V
    row[(ctx[-1] + (2 if ctx[-1] % 4 == 0 else 1)) % V] = 0.5
    return row


def test_pairwise_alpha_on_explicit_tables() -> None:
    """Along the successor's greedy path (after 0: 1, 2, ..., 16) the last token runs through
    16 consecutive values, 4 of them multiples of 4: the skipper agrees on 3/4 of the positions.
    Along the skipper's path (after 0: 2, 3, 4, 6, 7, 0, 2, ...; after 4: 6, 7, 0, 2, 3, 4, ...)
    the 16 last tokens hold 6 multiples of 4 for either prompt: the successor agrees on 10/16."""
    stages = [TableModel(skipper, vocab_size=V, name="skipper"),
              TableModel(successor, vocab_size=V, name="successor")]
    alpha = measure_pairwise_alpha(stages, [[0], [4]], new_tokens=16)
    assert alpha[0][0] == alpha[1][1] == 1.0
    assert alpha[0][1] == pytest.approx(0.75)
    assert alpha[1][0] == pytest.approx(10 / 16)
    with pytest.raises(ConfigError, match="prompt #2 is empty"):
        measure_pairwise_alpha(stages, [[0], []], new_tokens=4)
    with pytest.raises(ConfigError, match="new_tokens must be an integer >= 1, got 0"):
        measure_pairwise_alpha(stages, [[0]], new_tokens=0)


def test_pairwise_alpha_on_tiny_models(tiny_models: dict[str, Any]) -> None:
    """Sample size: 3 prompts x 24 greedy tokens per verifier. The self-agreement of two stages
    over the same weights is exact; a perturbed copy agrees sometimes, an unrelated model less;
    every rate is checked against cache-free forwards of the full sequence."""
    target, near, far = tiny_models["target"], tiny_models["near"], tiny_models["far"]
    stages = [HFStage(target, name="a"), HFStage(target, name="b"), HFStage(near, name="near"),
              HFStage(far, name="far")]
    prompts = [[3, 5, 7, 11], [1, 2, 3], [40, 41, 42, 43, 44]]
    alpha = measure_pairwise_alpha(stages, prompts, new_tokens=24)
    assert alpha[0][1] == alpha[1][0] == 1.0
    assert 0.0 < alpha[2][0] < 1.0 and 0.0 < alpha[0][2] < 1.0
    assert alpha[3][0] < alpha[2][0]

    def argmax_path(model: Any, ids: list[int], n: int) -> list[int]:
        out: list[int] = []
        with torch.inference_mode():
            for _ in range(n):
                out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
        return out

    for i, j in [(2, 0), (3, 0), (0, 2)]:
        agree = total = 0
        for ids in prompts:
            cont = argmax_path(stages[j].model, ids, 24)
            with torch.inference_mode():
                logits = stages[i].model(torch.tensor([ids + cont])).logits[0, len(ids) - 1 : -1]
            agree += int((logits.argmax(-1) == torch.tensor(cont)).sum())
            total += len(cont)
        assert alpha[i][j] == pytest.approx(agree / total)


class SleepyStage(TableModel):
    """A table stage whose every forward takes at least 5 ms; records the contexts it scores."""

    def __init__(self) -> None:
        super().__init__([0.25] * 4, name="sleepy")
        self.seen: list[int] = []

    def score(self, context: torch.Tensor, block: Block | None = None) -> torch.Tensor:
        import time

        self.seen.append(len(context))
        time.sleep(0.005)
        return super().score(context, block)


def test_measure_stage_time_times_single_token_decodes() -> None:
    stage = SleepyStage()
    seconds = measure_stage_time(stage, context_len=6, repeats=4, warmup=2)
    assert stage.seen == [6, 7, 8, 9, 10, 11, 12]  # prefill, 2 warm-up, 4 timed decodes
    assert 0.005 <= seconds < 0.5  # generous: the machine may be busy
    with pytest.raises(ConfigError, match="context_len must be an integer >= 1, got 0"):
        measure_stage_time(stage, context_len=0)
    with pytest.raises(ConfigError, match="repeats must be an integer >= 1"):
        measure_stage_time(stage, context_len=3, repeats=0)


class BlockSleeper(TableModel):
    """A table stage whose forward sleeps 3 ms per token of the block + 2 ms; records
    (context length, block length) of every call."""

    def __init__(self) -> None:
        super().__init__([0.25] * 4, name="sleeper")
        self.seen: list[tuple[int, int]] = []

    def score(self, context: torch.Tensor, block: Block | None = None) -> torch.Tensor:
        import time

        n = 0 if block is None else len(block)
        self.seen.append((len(context), n))
        time.sleep(0.002 + 0.003 * n)
        return super().score(context, block)


def test_measure_stage_costs_times_each_block_size() -> None:
    stage = BlockSleeper()
    cost = measure_stage_costs(stage, context_len=5, block_sizes=(1, 2, 4), repeats=3, warmup=1)
    # prefill, then per round r (context 6 + r): one forward per M, a block of M - 1 tokens
    assert stage.seen == [(5, 0)] + [(6 + r, m - 1) for r in range(4) for m in (1, 2, 4)]
    assert [m for m, _ in cost.points] == [1, 2, 4] and cost.name == "sleeper"
    assert 0.002 <= cost(1) < cost(2) < cost(4) < 0.5  # generous: the machine may be busy
    assert cost(3) == pytest.approx((cost(2) + cost(4)) / 2)
    bad: list[tuple[Any, str]] = [((), "at least one M"), ((2, 2), r"strictly increasing .* got 2 in \[2, 2\]"),
                                  ((0, 1), "got 0"), ((1, 2.5), "got 2.5")]
    for sizes, message in bad:
        with pytest.raises(ConfigError, match=message):
            measure_stage_costs(stage, 3, sizes)


def test_measure_stage_costs_feeds_m_tokens_to_the_model(tiny_models: dict[str, Any]) -> None:
    """On an ``HFStage`` every timed forward feeds the model exactly M new tokens."""
    stage = HFStage(tiny_models["near"], name="near")
    lengths: list[int] = []
    hook = stage.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(int(kwargs["input_ids"].shape[1])), with_kwargs=True)
    try:
        cost = measure_stage_costs(stage, context_len=7, block_sizes=(1, 3, 6), repeats=2, warmup=1)
    finally:
        hook.remove()
    assert lengths == [7] + [1, 3, 6] * 3
    assert all(t > 0 for _, t in cost.points) and stage.cached_tokens == ()


def test_measure_stage_costs_refuses_positions_past_the_context_length(tiny_models: dict[str, Any]) -> None:
    """Before: positions past the model's context were timed without a word. The tiny model
    holds 512 tokens; 1 warm-up + 2 timed rounds with M up to 4 reach context + 3 + 3."""
    stage = HFStage(tiny_models["near"], name="near")
    assert stage.context_length == 512
    cost = measure_stage_costs(stage, context_len=506, block_sizes=(1, 4), repeats=2, warmup=1)  # 512: fits
    assert [m for m, _ in cost.points] == [1, 4]
    with pytest.raises(ConfigError, match=r"a 507-token context \+ 3 rounds \(1 warm-up, 2 timed\) \+ 3 block tokens "
                                          r"\(M = 4\) = 513 tokens do not fit stage 'near', whose context length is "
                                          r"512 tokens; use a context of at most 506 tokens"):
        measure_stage_costs(stage, context_len=507, block_sizes=(1, 4), repeats=2, warmup=1)


def test_measure_stage_costs_runs_a_feature_draft_forward_at_every_m(tiny_models: dict[str, Any]) -> None:
    """A feature draft keeps a row per cached position: every timed forward, M = 1 included,
    must still run the head over M new slots (a measurement whose M = 1 context had been fed as
    the previous block would time a cache lookup)."""
    from pyramid_core.backends.hf.head import FeatureHead, FeatureHeadConfig
    from pyramid_core.backends.hf.head_stage import FeatureStage

    torch.manual_seed(0)
    stage = FeatureStage(FeatureHead(tiny_models["near"], FeatureHeadConfig()), name="feature")
    fed: list[int] = []
    run = stage._run

    def counting(u_prev: torch.Tensor, tokens: list[int], first: int, mask: Any) -> torch.Tensor:
        fed.append(len(tokens))
        return run(u_prev, tokens, first, mask)

    stage._run = counting  # type: ignore[method-assign]
    score = stage.score
    per_call: list[int] = []

    def scoring(context: torch.Tensor, block: Block | None = None) -> torch.Tensor:
        before = sum(fed)
        rows = score(context, block)
        per_call.append(sum(fed) - before)
        return rows

    stage.score = scoring  # type: ignore[method-assign]
    measure_stage_costs(stage, context_len=5, block_sizes=(1, 3), repeats=2, warmup=1)
    # the prefill's 5 slots, then per round: M = 1 runs the one new context slot, M = 3 the two
    # block slots (the context's last row is already there: a draft is never handed M tokens to verify)
    assert per_call == [5] + [1, 2] * 3


@pytest.mark.parametrize(("alpha", "ell", "n"), [(0.6, 4, 32), (0.3, 16, 20), (0.95, 8, 64)])
def test_effective_alpha_inverts_the_finite_horizon_model(alpha: float, ell: int, n: int) -> None:
    measured = predict_chain([alpha], [ell], [0.0, 1.0], new_tokens=n).tokens_per_target_forward
    assert alpha_for_tokens_per_forward(measured, ell, n) == pytest.approx(alpha, abs=1e-6)
    assert alpha_for_tokens_per_forward(1.0, ell, n) == 0.0
    assert alpha_for_tokens_per_forward(ell + 1.0, ell, n) == 1.0


class Oracle:
    """A model-free proposer that knows the successor table: always right (or silent)."""

    vocab_size = V

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent

    def propose(self, context: torch.Tensor, n: int, rng: Rng) -> Block:
        if self.silent:
            return Block(torch.zeros(0, dtype=torch.long), torch.zeros(0, V))
        last = int(context[-1])
        tokens = torch.tensor([(last + 1 + k) % V for k in range(n)])
        return Block(tokens, torch.nn.functional.one_hot(tokens, V).float())


def test_proposer_alpha_from_a_pipeline_run() -> None:
    target = TableModel(successor, vocab_size=V, name="successor")
    assert measure_proposer_alpha(Oracle(), target, [[0], [3]], 24, block_length=4) == pytest.approx(1.0)
    # a proposer that never proposes delivers one token per forward: effective alpha 0, although
    # it is never rejected (latency.measure_alpha would have no data at all)
    assert measure_proposer_alpha(Oracle(silent=True), target, [[0]], 24, block_length=4) == 0.0


# --- pyramid plan, end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "tiny-plan"
    save_with_words(tiny_llama(21, num_layers=2), path)
    return path


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "prompts.txt"
    path.write_text("w3 w5 w7 w9 w3 w5 w7\nw10 w11 w12 w13 w14\n")
    return path


def test_cli_plan_end_to_end(saved_model: Path, prompt_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stages = ["ngram", f"hf:path={saved_model},num_layers=1", f"hf:path={saved_model}"]
    common = [a for s in stages for a in ("--stage", s)] + [
        "--prompts", str(prompt_file), "--no-chat", "--new-tokens", "8", "--max-length", "4", "--repeats", "3"]
    assert main(["plan", *common]) == 0
    out = capsys.readouterr().out
    assert "| rank | chain | lengths | alphas | predicted tok/s | predicted speedup |" in out
    assert "ngram (proposer)" in out and "| ms/forward by M |" in out and " 5: " in out
    command = next(line for line in out.splitlines() if line.startswith("pyramid generate"))
    argv = shlex.split(command)[1:]
    ns = build_parser().parse_args(argv)
    assert ns.stage[-1] == stages[-1] and ns.chat is False and ns.prompt == "YOUR PROMPT"

    assert main(["plan", *common, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["candidates"] == stages and data["proposers"] == ["ngram"]
    assert data["run"]["command"] == "pyramid plan" and data["run"]["arguments"]["stage"] == stages
    assert data["forward_times"][0] == 0.0 and all(t > 0 for t in data["forward_times"][1:])
    # T(M) measured at every M a verification can feed (max length 4: M = 1..5)
    assert [[m for m, _ in c] for c in data["forward_costs"][1:]] == [[1, 2, 3, 4, 5]] * 2
    assert data["forward_costs"][0] == [[1, 0.0]]
    alpha = data["alpha"]
    assert alpha[1][2] is not None and 0.0 <= alpha[1][2] <= 1.0 and alpha[2][2] == 1.0
    assert 0.0 <= alpha[0][1] <= 1.0 and 0.0 <= alpha[0][2] <= 1.0
    assert len(data["ranked"]) == 4 and [stages[-1]] in [c["chain"] for c in data["ranked"]]
    best = data["best"]
    assert best["chain"][-1] == stages[-1] and best["speedup"] >= 1.0
    # the printed command runs the chosen chain
    argv = shlex.split(data["command"])[1:]
    argv[argv.index("YOUR PROMPT")] = "w3 w5 w7"
    assert main([*argv, "--max-new-tokens", "4"]) == 0


def test_cli_plan_errors(saved_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan"]) == 2
    assert "give the candidates as --stage NAME[:k=v,...]" in capsys.readouterr().err
    assert main(["plan", "--stage", f"hf:path={saved_model}", "--stage", "ngram"]) == 2
    assert "the target (the last --stage, 'ngram') must be a model backend" in capsys.readouterr().err
    assert main(["plan", "--stage", "ngram", "--stage", "ngram", "--stage", f"hf:path={saved_model}"]) == 2
    assert "--stage 'ngram' is given twice" in capsys.readouterr().err


def test_cli_plan_with_a_feature_draft(saved_model: Path, prompt_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A feature draft is planned as a first stage that has a cost: T(M) measured like a model's,
    alpha per verifier from a 2-stage run at --feature-length, never a verifier; the command the
    plan prints runs its chain (the pipeline wires the features)."""
    feature = f"feature:base={saved_model}"
    stages = [feature, f"hf:path={saved_model},num_layers=1", f"hf:path={saved_model}"]
    common = [a for s in stages for a in ("--stage", s)] + [
        "--prompts", str(prompt_file), "--no-chat", "--new-tokens", "8", "--max-length", "3", "--repeats", "2",
        "--feature-length", "2", "--no-compile"]
    assert main(["plan", *common]) == 0
    out = capsys.readouterr().out
    assert f"{feature} (drafts only)" in out and "feature drafts (" in out and "length 2, first stage only" in out
    assert main(["plan", *common, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["proposers"] == [feature]
    assert data["forward_times"][0] > 0 and [m for m, _ in data["forward_costs"][0]] == [1, 2, 3, 4]
    alpha = data["alpha"]
    assert 0.0 <= alpha[0][1] <= 1.0 and 0.0 <= alpha[0][2] <= 1.0
    assert alpha[1][0] is None and alpha[2][0] is None  # nothing drafts for a feature draft (JSON null)
    assert all(c["chain"][0] == feature or feature not in c["chain"] for c in data["ranked"])
    argv = shlex.split(data["command"])[1:]
    argv[argv.index("YOUR PROMPT")] = "w3 w5 w7"
    assert main([*argv, "--max-new-tokens", "4"]) == 0
