"""``block``: block verification (Sun et al., arXiv 2403.10444; docs/algorithms.md "Block verification").

What is checked, and how:
- an independent numpy reference of the rule (written from the formula, sharing no code with
  ``pyramid_plugins.block``) is exact by enumeration, reproduces the paper's worked example, and
  shows how far the three tempting mistakes are from the target;
- chi-square exactness of whole pipelines over context-dependent (Markov) tables: N = 2, 3, 4
  stages, ``block`` at every boundary or mixed with ``exact``, temperature 1, top-k and top-p;
  a deterministic proposer (``ngram``) and a proposer that stops on its own confidence;
- negative controls (the three mistakes) rejected by the very same tests;
- acceptance: ``block`` >= ``exact`` on every table, and the mean accepted length of the library
  equals the reference's enumerated value on i.i.d. tables;
- greedy identity, the conformance contract, and unit tests on explicit vectors.

Statistical conventions (tests/stats.py): every run is seeded; a lossless configuration must give
p > ALPHA = 1e-4 and a deliberately wrong one p < REJECT = 1e-6 on the same samples. Sample sizes
and tolerances are stated per test. Pipelines over tables cost about 1-2 ms per generation here.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from stats import (
    ALPHA,
    REJECT,
    chisquare_pvalue,
    counts,
    markov_marginal,
    markov_matrix,
    sample_positions,
    tv,
)

from pyramid_core import Block, Pipeline, Rng, SamplingConfig, Verdict, build_pipeline, make_policy
from pyramid_core.plugins import registries
from pyramid_core.testing import TableModel, check_policy_contract, check_policy_lossless
from pyramid_plugins.block import BlockPolicy, path_weights, stop_probabilities
from pyramid_plugins.exact import ExactPolicy

V = 4
PROMPT = [0, 2]  # generation starts after token 2

# Markov tables, smallest stage first (row a: the next-token distribution after token a).
# Neighbouring stages differ by a total variation of 0.2-0.5 in every row (checked below).
MARKOV = [
    [[0.25, 0.35, 0.20, 0.20], [0.10, 0.35, 0.45, 0.10], [0.35, 0.45, 0.10, 0.10], [0.05, 0.30, 0.45, 0.20]],
    [[0.05, 0.60, 0.05, 0.30], [0.35, 0.25, 0.20, 0.20], [0.15, 0.40, 0.30, 0.15], [0.15, 0.15, 0.20, 0.50]],
    [[0.35, 0.30, 0.20, 0.15], [0.30, 0.50, 0.10, 0.10], [0.20, 0.05, 0.35, 0.40], [0.25, 0.50, 0.15, 0.10]],
    [[0.10, 0.25, 0.20, 0.45], [0.60, 0.20, 0.15, 0.05], [0.30, 0.25, 0.40, 0.05], [0.45, 0.30, 0.10, 0.15]],
]

# Tables built to expose the three mistakes (two stages, start after token 0): the draft picks
# token 1 (weight w_1 = 0.45 / 0.9 = 1/2) and then, after token 1, the weighted correction
# norm(max(w_1 p - q, 0)) is one-hot at 2 where the unweighted one puts 3/5 of its mass on 3.
TRAP_TARGET = [[0.05, 0.45, 0.45, 0.05], [0.00, 0.00, 0.40, 0.60], [0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]]
TRAP_DRAFT = [[0.00, 0.90, 0.10, 0.00], [0.68, 0.00, 0.00, 0.32], [0.40, 0.30, 0.20, 0.10], [0.10, 0.20, 0.30, 0.40]]
TRAP_PROMPT = [0]


def markov_fn(matrix: Sequence[Sequence[float]]) -> Callable[[tuple[int, ...]], Sequence[float]]:
    return lambda ctx: matrix[ctx[-1]]


def markov_stages(tables: Sequence[Sequence[Sequence[float]]]) -> list[TableModel]:
    return [TableModel(markov_fn(t), vocab_size=V, name=f"M{i + 1}") for i, t in enumerate(tables)]


def transformed(matrix: Sequence[Sequence[float]], sampling: SamplingConfig) -> np.ndarray:
    """The Markov matrix after the sampling transform, computed exactly as a ``TableModel`` row
    travels (float32 log-probabilities as logits, then ``SamplingConfig.transform``)."""
    logits = torch.tensor(matrix, dtype=torch.float64).float().log()
    out = sampling.transform(logits).double().numpy()
    return out / out.sum(-1, keepdims=True)


# ------------------------------------------------------------------ the reference (numpy, from the formula)
def _normalised(v: np.ndarray) -> np.ndarray:
    return v / v.sum()


def reference_outcomes(tokens: Sequence[int], q: np.ndarray, p: np.ndarray, *, variant: str = "block") -> dict[tuple[int, int], float]:
    """Exact law of (tau, emitted token) for one chain: ``q`` has a row per token, ``p`` one more.
    w_0 = 1, w_i = min(1, w_{i-1} p_i(x_i)/q_i(x_i)); h_i = Z_i/(Z_i + 1 - w_i) (1 if 0/0) with
    Z_i = sum max(w_i p_{i+1} - q_{i+1}, 0) for i < g, h_g = w_g; tau = the largest i with
    eta_i <= h_i; y from p_{g+1} or norm(max(w_tau p_{tau+1} - q_{tau+1}, 0)).

    ``variant`` selects a deliberately wrong rule: ``first-failure`` (tau = the number of leading
    successes), ``first-success`` (the smallest success) or ``unweighted`` (the correction from
    norm(max(p - q, 0)) without w_tau)."""
    g = len(tokens)
    w = [1.0]
    for i, x in enumerate(tokens):
        w.append(min(1.0, w[-1] * p[i][x] / q[i][x]))
    h = [1.0]  # h[0] is never tested: "none succeeded" means tau = 0
    for i in range(1, g):
        z = np.maximum(w[i] * p[i] - q[i], 0.0).sum()
        h.append(z / (z + 1.0 - w[i]) if z + 1.0 - w[i] > 0 else 1.0)
    h.append(w[g])
    tau_law = np.zeros(g + 1)
    for t in range(g + 1):
        if variant == "first-failure":  # successes at 1..t, then a failure at t+1 (if any)
            tau_law[t] = np.prod(h[1 : t + 1]) * (1.0 - h[t + 1] if t < g else 1.0)
        elif variant == "first-success":  # failures at 1..t-1, a success at t (t = 0: none)
            tau_law[t] = np.prod([1.0 - v for v in h[1:]]) if t == 0 else np.prod([1.0 - v for v in h[1:t]]) * h[t]
        else:  # the largest success: a success at t (always, for t = 0), failures after it
            tau_law[t] = (h[t] if t > 0 else 1.0) * np.prod([1.0 - v for v in h[t + 1 :]])
    out: dict[tuple[int, int], float] = {}
    for t in range(g + 1):
        if t == g:
            row = np.asarray(p[g], dtype=float)
        else:
            weight = 1.0 if variant == "unweighted" else w[t]
            excess = np.maximum(weight * p[t] - q[t], 0.0)
            row = _normalised(excess) if excess.sum() > 0 else np.asarray(p[t], dtype=float)
        for y in range(len(row)):
            if tau_law[t] * row[y] > 0:
                out[(t, y)] = out.get((t, y), 0.0) + tau_law[t] * row[y]
    return out


def reference_sequence_law(target: np.ndarray, draft: np.ndarray, start: int, g: int, length: int, *,
                           variant: str = "block") -> np.ndarray:
    """``Float[ndarray, "V**length"]``: the law of the first ``length`` generated tokens of a
    2-stage chain with block length g over Markov tables, one verification followed by the target
    (which is what the pipeline's later rounds produce when the rule is exact), by enumerating
    every draft block."""
    law = np.zeros((V,) * length)
    for block in itertools.product(range(V), repeat=g):
        prev, prob, q_rows, p_rows = start, 1.0, [], []
        for x in block:
            q_rows.append(draft[prev])
            p_rows.append(target[prev])
            prob *= draft[prev][x]
            prev = x
        if prob == 0:
            continue
        p_rows.append(target[prev])
        for (t, y), pr in reference_outcomes(block, np.array(q_rows), np.array(p_rows), variant=variant).items():
            stack = [([*block[:t], y], prob * pr)]
            while stack:  # continue with the target up to ``length`` tokens
                seq, mass = stack.pop()
                if len(seq) >= length:
                    law[tuple(seq[:length])] += mass
                    continue
                stack += [([*seq, z], mass * target[seq[-1]][z]) for z in range(V) if target[seq[-1]][z] > 0]
    return law.ravel()


def markov_sequence_law(matrix: np.ndarray, start: int, length: int) -> np.ndarray:
    law = np.zeros((V,) * length)
    for seq in itertools.product(range(V), repeat=length):
        prev, prob = start, 1.0
        for x in seq:
            prob *= matrix[prev][x]
            prev = x
        law[seq] = prob
    return law.ravel()


def reference_mean_accepted(p: Sequence[float], q: Sequence[float], g: int) -> float:
    """E[tau] of the reference rule on context-free rows, enumerating all V**g blocks."""
    p_, q_ = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    total = 0.0
    for block in itertools.product(range(len(q_)), repeat=g):
        prob = float(np.prod(q_[list(block)]))
        if prob > 0:
            law = reference_outcomes(block, np.tile(q_, (g, 1)), np.tile(p_, (g + 1, 1)))
            total += prob * sum(t * mass for (t, _), mass in law.items())
    return total


def tokenwise_mean_accepted(p: Sequence[float], q: Sequence[float], g: int) -> float:
    """E[accepted] of token-wise rejection on context-free rows: sum_{i<=g} alpha^i."""
    alpha = float(np.minimum(p, q).sum())
    return sum(alpha**i for i in range(1, g + 1))


def test_tables_differ_between_neighbouring_stages() -> None:
    for a, b in itertools.pairwise(MARKOV):
        for row_a, row_b in zip(a, b, strict=True):
            assert 0.2 <= tv(row_a, row_b) <= 0.5
            assert sum(row_a) == pytest.approx(1.0) and sum(row_b) == pytest.approx(1.0)


def test_the_reference_reproduces_the_papers_example() -> None:
    """Sun et al.'s motivating example (context-free p = (1/3, 2/3), q = (2/3, 1/3), gamma = 2):
    token-wise verification accepts 10/9 tokens per block in expectation, block verification 11/9."""
    p, q = [1 / 3, 2 / 3], [2 / 3, 1 / 3]
    assert tokenwise_mean_accepted(p, q, 2) == pytest.approx(10 / 9)
    assert reference_mean_accepted(p, q, 2) == pytest.approx(11 / 9)


@pytest.mark.parametrize("g", [1, 2, 3, 4])
def test_the_reference_rule_is_exact_by_enumeration(g: int) -> None:
    """The reference rule's output law equals the target's on the first g + 1 tokens, for the
    Markov pairs used below and the trap tables (float64, 1e-12); the three mistakes are exact only
    for g = 1 and are far from the target on the trap tables (TV >= 0.07 on two tokens)."""
    pairs = [(np.array(MARKOV[k + 1]), np.array(MARKOV[k]), PROMPT[-1]) for k in range(3)]
    pairs.append((np.array(TRAP_TARGET), np.array(TRAP_DRAFT), TRAP_PROMPT[-1]))
    for target, draft, start in pairs:
        law = reference_sequence_law(target, draft, start, g, min(g + 1, 3))
        np.testing.assert_allclose(law, markov_sequence_law(target, start, min(g + 1, 3)), atol=1e-12)
    target, draft = np.array(TRAP_TARGET), np.array(TRAP_DRAFT)
    exact_law = markov_sequence_law(target, 0, 2)
    for variant, distance in (("first-failure", 0.19), ("first-success", 0.12), ("unweighted", 0.07)):
        law = reference_sequence_law(target, draft, 0, g, 2, variant=variant)
        if g == 1:
            np.testing.assert_allclose(law, exact_law, atol=1e-12)
        else:
            assert tv(law, exact_law) > distance, variant


def test_block_never_accepts_less_than_tokenwise_in_expectation() -> None:
    """By enumeration on context-free rows (the Theorem of the paper, at these tables): equal for
    gamma = 1, at least as large for gamma = 2..4, and strictly larger at gamma = 4."""
    for target, draft in CONTEXT_FREE:
        for g in (1, 2, 3, 4):
            block, tokenwise = reference_mean_accepted(target, draft, g), tokenwise_mean_accepted(target, draft, g)
            if g == 1:
                assert block == pytest.approx(tokenwise)
            else:
                assert block >= tokenwise - 1e-12
        assert reference_mean_accepted(target, draft, 4) > tokenwise_mean_accepted(target, draft, 4) + 0.1


# ------------------------------------------------------------------ chi-square exactness of pipelines
RUNS, LENGTH = 1500, 4

# (policies, block lengths, sampling): N = 2, 3, 4, block at every boundary or mixed with exact
PIPELINES = [
    (["block"], [4], SamplingConfig()),
    (["block", "block"], [3, 3], SamplingConfig()),
    (["block", "block", "block"], [3, 3, 3], SamplingConfig()),
    (["block", "exact", "block"], [2, 2, 3], SamplingConfig()),
    (["block", "block"], [3, 3], SamplingConfig(top_k=3)),
    (["exact", "block"], [3, 3], SamplingConfig(top_p=0.7)),
]
PIPELINE_IDS = ["N2", "N3", "N4", "N4-mixed", "N3-top_k3", "N3-top_p0.7-mixed"]


def marginal_pvalues(samples: np.ndarray, matrix: np.ndarray) -> list[float]:
    """Chi-square p of generated tokens 1..LENGTH against e_2 T^s, s = 1..LENGTH."""
    return [chisquare_pvalue(counts(samples[:, s - 1], V), markov_marginal(matrix, PROMPT[-1], s))
            for s in range(1, samples.shape[1] + 1)]


def pair_pvalue(samples: np.ndarray, matrix: np.ndarray, start: int = PROMPT[-1]) -> float:
    """Chi-square p of the first two generated tokens (16 cells) against the chain's pair law."""
    return chisquare_pvalue(counts(samples[:, 0] * V + samples[:, 1], V * V), markov_sequence_law(matrix, start, 2))


@pytest.mark.parametrize(("policies", "ells", "sampling"), PIPELINES, ids=PIPELINE_IDS)
def test_pipeline_output_is_an_exact_sample_of_the_target(policies: list[str], ells: list[int], sampling: SamplingConfig) -> None:
    """1500 seeded runs of 4 tokens after prompt [0, 2] over the last N Markov tables. Each of the
    generated tokens 1..4 must fit the target's (transformed) propagated marginal, and the first
    two tokens the pair law (chi-square, ALPHA each). Power: the same first two tokens reject the
    pair law of the stage below the target (row TV >= 0.2) at 1e-6."""
    tables = MARKOV[len(MARKOV) - len(policies) - 1 :]
    pipe = build_pipeline(list(markov_stages(tables)), policies, ells, sampling=sampling, stop_ids=[])
    samples = sample_positions(lambda s: pipe.generate(PROMPT, LENGTH, seed=s).tokens, RUNS, LENGTH)
    target = transformed(tables[-1], sampling)
    p_values = marginal_pvalues(samples, target)
    assert min(p_values) > ALPHA, p_values
    assert pair_pvalue(samples, target) > ALPHA
    assert pair_pvalue(samples, transformed(tables[-2], sampling)) < REJECT


NGRAM_PROMPT = [0, 1, 2, 3, 0, 1, 2, 3, 0, 2]  # repetitive, so prompt lookup finds matches


def test_a_deterministic_proposer_stays_exact() -> None:
    """``ngram`` proposes one-hot rows -- the exact law of a deterministic proposal -- verified by
    ``block`` (N = 3: ngram -> M3 -> M4, block lengths [2, 3]). 1500 runs x 4 tokens after a
    repetitive prompt ending in 2: every position fits the target marginal and the first two
    tokens its pair law (ALPHA); the pair law of M3 is rejected at 1e-6; ngram's tokens are both
    accepted and rejected (acceptance between 0.1 and 0.9)."""
    pipe = build_pipeline(["ngram", *markov_stages(MARKOV[2:])], ["block", "block"], [2, 3], stop_ids=[])
    seen = {"proposed": 0, "accepted": 0}

    def generate(seed: int) -> torch.Tensor:
        gen = pipe.generate(NGRAM_PROMPT, LENGTH, seed=seed)
        seen["proposed"] += gen.metrics.boundaries[0].proposed
        seen["accepted"] += gen.metrics.boundaries[0].accepted
        return gen.tokens

    samples = sample_positions(generate, RUNS, LENGTH)
    assert 0.1 < seen["accepted"] / seen["proposed"] < 0.9
    target, below = markov_matrix(markov_fn(MARKOV[-1]), V), markov_matrix(markov_fn(MARKOV[-2]), V)
    assert min(marginal_pvalues(samples, target)) > ALPHA
    assert pair_pvalue(samples, target) > ALPHA
    assert pair_pvalue(samples, below) < REJECT


@attrs.define(eq=False)
class ConfidenceStopProposer:
    """A bottom proposer that ends its block on its own confidence: before drawing token j >= 2 it
    stops when the largest probability of its row is below ``threshold``. The decision uses only
    the earlier tokens and rows -- a stopping time (docs/algorithms.md, trap 2) -- so the block stays exact."""

    stage: TableModel
    threshold: float
    peek: bool = False  # negative control: decide on the token just drawn instead (not a stopping time)
    lengths: list[int] = attrs.field(factory=list)

    def propose(self, context: torch.Tensor, n: int, rng: Rng) -> Block:
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        for j in range(n):
            row = SamplingConfig().transform(self.stage.score(torch.tensor([*context.tolist(), *tokens])))[0]
            if not self.peek and j > 0 and float(row.max()) < self.threshold:
                break
            token = rng.categorical(row)
            if self.peek and j > 0 and float(row[token]) < self.threshold:
                break  # BUG (on purpose): drops the token it just drew because of its own probability
            tokens.append(token)
            rows.append(row)
        self.lengths.append(len(tokens))
        return Block(torch.tensor(tokens, dtype=torch.long), torch.stack(rows))


def confidence_samples(policies: Sequence[Any], threshold: float, peek: bool = False) -> tuple[np.ndarray, list[int]]:
    tables = MARKOV[4 - len(policies) - 1 :]
    stages = markov_stages(tables)
    bottom = ConfidenceStopProposer(stages[0], threshold, peek)
    pipe = Pipeline([bottom, *stages[1:]], list(policies), [4] * len(policies))
    return sample_positions(lambda s: pipe.generate(PROMPT, LENGTH, seed=s).tokens, RUNS, LENGTH), bottom.lengths


@pytest.mark.parametrize("n_stages", [2, 3])
def test_blocks_that_stop_on_the_proposers_confidence_stay_exact(n_stages: int) -> None:
    """The bottom proposer asks for up to 4 tokens and stops before any token whose row has a
    largest probability below 0.42 (block lengths 1..4 all occur), ``block`` at every boundary.
    1500 runs x 4 tokens: every position fits the target marginal and the first two tokens the
    pair law (ALPHA). Power: the same test rejects (1e-6) a proposer that decides on the token it
    just drew (it drops a token whose own probability is below 0.2 -- not a stopping time)."""
    policies = [BlockPolicy()] * (n_stages - 1)
    samples, lengths = confidence_samples(policies, 0.42)
    assert set(lengths) == {1, 2, 3, 4}
    target = markov_matrix(markov_fn(MARKOV[-1]), V)
    assert min(marginal_pvalues(samples, target)) > ALPHA
    assert pair_pvalue(samples, target) > ALPHA
    peeking, _ = confidence_samples(policies, 0.2, peek=True)
    assert min(pair_pvalue(peeking, target), *marginal_pvalues(peeking, target)) < REJECT


# ------------------------------------------------------------------ negative controls
def block_parts(block: Block, p: torch.Tensor, rng: Rng) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_1..w_n, h_1..h_n, eta_1..eta_n, q) from the library's own helpers, in the library's
    dtypes and drawing eta as it does, so a control below differs from ``BlockPolicy`` only by its
    bug (``test_the_controls_differ_from_the_library_only_by_their_bug``)."""
    n = len(block)
    q = block.rows.to(device=p.device, dtype=p.dtype)
    x = block.tokens.unsqueeze(-1)
    w = path_weights(p[:n].gather(-1, x).squeeze(-1), q.gather(-1, x).squeeze(-1))
    before = torch.cat([w.new_ones(1), w[:-1]]).to(p.dtype)
    mass = (before.unsqueeze(-1) * p[:n] - q).clamp(min=0).sum(-1)
    return w, stop_probabilities(w, mass), rng.uniform(n, p.device).to(w.dtype), q


@attrs.frozen
class ControlBlock:
    """``block`` with one mistake, or none (``mistake=""``, shown to equal the library below)."""

    mistake: str = ""

    def decide(self, block: Block, p: torch.Tensor, rng: Rng) -> Verdict:
        n = len(block)
        if n == 0:
            return Verdict((), rng.categorical(p[0]), p[0])
        w, h, eta, q = block_parts(block, p, rng)
        ok = (eta < h).tolist()
        if self.mistake == "first-failure":  # token-wise thinking: stop at the first failed eta
            tau = next((i for i, good in enumerate(ok) if not good), n)
        elif self.mistake == "first-success":
            tau = next((i + 1 for i, good in enumerate(ok) if good), 0)
        else:
            tau = max((i + 1 for i, good in enumerate(ok) if good), default=0)
        if tau == n:
            return Verdict(tuple(range(n)), rng.categorical(p[n]), p[n])
        weight = w.new_ones(()) if self.mistake == "unweighted" or tau == 0 else w[tau - 1]
        excess = (weight.to(p.dtype) * p[tau] - q[tau]).clamp(min=0)
        row = excess if float(excess.sum()) > 0 else p[tau]
        return Verdict(tuple(range(tau)), rng.categorical(row), p[tau])


TRAP_RUNS = 2000


def trap_samples(policy: Any, g: int) -> np.ndarray:
    """TRAP_RUNS = 2000 seeded runs of g tokens (so the first block has all g tokens), draft
    TRAP_DRAFT -> target TRAP_TARGET, block length g."""
    pipe = Pipeline(markov_stages([TRAP_DRAFT, TRAP_TARGET]), [policy], [g])
    return sample_positions(lambda s: pipe.generate(TRAP_PROMPT, g, seed=s).tokens, TRAP_RUNS, g)


def test_the_controls_differ_from_the_library_only_by_their_bug() -> None:
    """Without a mistake, ``ControlBlock`` gives the library's verdicts token for token (same
    seeds, 300 generations of 6 tokens over the trap tables and the Markov tables)."""
    for tables, prompt in (([TRAP_DRAFT, TRAP_TARGET], TRAP_PROMPT), (MARKOV[2:], PROMPT)):
        ours = Pipeline(markov_stages(tables), [ControlBlock()], [3])
        library = Pipeline(markov_stages(tables), [BlockPolicy()], [3])
        for seed in range(150):
            assert ours.generate(prompt, 6, seed=seed).token_list == library.generate(prompt, 6, seed=seed).token_list


def test_the_three_tempting_mistakes_are_detected() -> None:
    """Two stages over the trap tables, block length g = 3, 2000 runs x 3 tokens, chi-square of the
    first two tokens against the target's pair law (``pair_pvalue``). The library passes at ALPHA;
    stopping at the first failed eta (analytic TV 0.21 on the two tokens), at the first success
    (0.13) and the correction without the weight w_tau (0.07) are each rejected at 1e-6 by the
    same test on the same seeds."""
    target, g = np.array(TRAP_TARGET), 3
    assert pair_pvalue(trap_samples(BlockPolicy(), g), target, TRAP_PROMPT[-1]) > ALPHA
    for mistake in ("first-failure", "first-success", "unweighted"):
        assert pair_pvalue(trap_samples(ControlBlock(mistake), g), target, TRAP_PROMPT[-1]) < REJECT, mistake


# ------------------------------------------------------------------ acceptance
def mean_accepted(policy: str, tables: Sequence[Sequence[Sequence[float]]], prompt: Sequence[int]) -> tuple[float, float, int]:
    """(mean accepted tokens per verification, its variance, rounds), pooled over 12 seeded
    generations of 120 tokens, 2 stages, block length 4."""
    pipe = build_pipeline(list(markov_stages(tables)), [policy], [4], stop_ids=[])
    lengths: list[int] = []
    for seed in range(12):
        hist = pipe.generate(prompt, 120, seed=seed).metrics.boundaries[0].accepted_hist
        lengths += [k for k, rounds in enumerate(hist) for _ in range(rounds)]
    return float(np.mean(lengths)), float(np.var(lengths, ddof=1)), len(lengths)


ACCEPTANCE_TABLES = [(MARKOV[k : k + 2], PROMPT) for k in range(3)] + [([TRAP_DRAFT, TRAP_TARGET], TRAP_PROMPT)]


@pytest.mark.parametrize(("tables", "prompt"), ACCEPTANCE_TABLES, ids=["M1-M2", "M2-M3", "M3-M4", "trap"])
def test_block_accepts_at_least_as_many_tokens_as_exact(tables: list[Any], prompt: list[int]) -> None:
    """Mean accepted tokens per verification over the same tables and seeds (12 generations of 120
    tokens, about 500-600 rounds per rule, block length 4): block's mean may not fall below
    exact's by more than 4 standard errors of the difference (one-sided, p ~ 3e-5 under equality)."""
    block, var_b, n_b = mean_accepted("block", tables, prompt)
    exact, var_e, n_e = mean_accepted("exact", tables, prompt)
    margin = 4 * np.sqrt(var_b / n_b + var_e / n_e)
    assert block >= exact - margin, (block, exact, margin)


# context-free (target, draft) rows for the reference comparison
CONTEXT_FREE = [
    ([0.40, 0.30, 0.20, 0.10], [0.15, 0.45, 0.25, 0.15]),
    ([0.05, 0.10, 0.25, 0.60], [0.60, 0.25, 0.10, 0.05]),
    ([0.70, 0.10, 0.10, 0.10], [0.25, 0.25, 0.25, 0.25]),
]


@pytest.mark.parametrize(("target", "draft"), CONTEXT_FREE, ids=["near", "far", "peaked"])
def test_mean_accepted_length_matches_the_reference(target: list[float], draft: list[float]) -> None:
    """Context-free rows, gamma = 4: 4000 decisions of the library on blocks drawn from the draft
    row. The mean accepted length must be within 4.5 standard errors of the reference's enumerated
    E[tau] (two-sided, p ~ 7e-6 if the library were right), and more than 4.5 standard errors
    above token-wise rejection's sum alpha^i (the gains are 0.13-0.38 tokens here)."""
    n, g = 4000, 4
    gen = torch.Generator().manual_seed(17)
    rng = Rng(17)
    q, p = torch.tensor(draft).expand(g, -1), torch.tensor(target).expand(g + 1, -1)
    taus = np.array([
        BlockPolicy().decide(Block(torch.multinomial(q, 1, generator=gen).squeeze(-1), q), p, rng).n_accepted
        for _ in range(n)
    ])
    se = taus.std(ddof=1) / np.sqrt(n)
    expected = reference_mean_accepted(target, draft, g)
    assert abs(taus.mean() - expected) < 4.5 * se, (taus.mean(), expected, se)
    assert taus.mean() > tokenwise_mean_accepted(target, draft, g) + 4.5 * se


# ------------------------------------------------------------------ greedy
# Greedy stages: the target is MARKOV[-1] (argmax after 0, 1, 2, 3: 3, 0, 2, 0); each smaller stage
# agrees with the argmax of the stage above it in two or three of the four contexts, so drafts are
# both accepted and rejected at every boundary.
GREEDY = [
    [[0.10, 0.20, 0.20, 0.50], [0.20, 0.50, 0.20, 0.10], [0.10, 0.50, 0.20, 0.20], [0.40, 0.30, 0.20, 0.10]],
    [[0.10, 0.30, 0.20, 0.40], [0.20, 0.50, 0.20, 0.10], [0.20, 0.20, 0.50, 0.10], [0.30, 0.45, 0.15, 0.10]],
    [[0.10, 0.25, 0.20, 0.45], [0.60, 0.20, 0.15, 0.05], [0.30, 0.25, 0.40, 0.05], [0.30, 0.45, 0.10, 0.15]],
    MARKOV[-1],
]


def greedy_path(matrix: Sequence[Sequence[float]], last: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        last = int(np.argmax(matrix[last]))
        out.append(last)
    return out


@pytest.mark.parametrize(("policies", "ells"), [(["block"], [4]), (["block", "block"], [3, 5]), (["block", "exact", "block"], [2, 2, 3])])
def test_greedy_output_is_the_targets_greedy_path(policies: list[str], ells: list[int]) -> None:
    """Temperature 0: every row is one-hot, and the output (30 tokens after each of 4 prompts) is
    token for token the argmax path of the target table (every row has a unique maximum). Drafts
    are accepted and rejected at every boundary."""
    tables = GREEDY[len(GREEDY) - len(policies) - 1 :]
    pipe = build_pipeline(list(markov_stages(tables)), policies, ells, sampling=SamplingConfig.greedy(), stop_ids=[])
    proposed, accepted = np.zeros(len(policies)), np.zeros(len(policies))
    for last in range(V):
        gen = pipe.generate([1, last], 30)
        assert gen.token_list == greedy_path(tables[-1], last, 30)
        proposed += [b.proposed for b in gen.metrics.boundaries]
        accepted += [b.accepted for b in gen.metrics.boundaries]
    assert (accepted > 0).all() and (accepted < proposed).all(), (accepted, proposed)


# ------------------------------------------------------------------ contract, registry
def test_block_passes_the_policy_contract() -> None:
    report = check_policy_contract(BlockPolicy())
    assert report.decisions == 240
    check_policy_contract("block", seed=3)


def test_block_passes_the_packaged_lossless_check() -> None:
    """``check_policy_lossless`` on its default tables, 300 runs per case and block length."""
    assert check_policy_lossless("block", samples=300).lossless


def test_block_is_registered_through_its_entry_point() -> None:
    regs = registries()
    assert isinstance(make_policy("block"), BlockPolicy)
    assert regs.policies.get("block").plugin == "block"
    assert any(info.name == "block" and ("policy", "block") in info.registered for info in regs.plugins)


def test_trees_are_refused_with_a_pointer_to_traversal() -> None:
    tree = Block(torch.tensor([1, 2]), torch.full((2, V), 0.25), torch.tensor([-1, -1]))
    with pytest.raises(ValueError, match=r"'block' verifies chains.*tree of 2 nodes.*use policy 'traversal'"):
        BlockPolicy().decide(tree, torch.full((3, V), 0.25), Rng(0))
    with pytest.raises(ValueError, match=r"'block': a block of 2 tokens needs 3 verifier rows.*\(2, 4\)"):
        BlockPolicy().decide(Block(torch.tensor([1, 2]), torch.full((2, V), 0.25)), torch.full((2, V), 0.25), Rng(0))


# ------------------------------------------------------------------ explicit vectors
Q_ROW = torch.tensor([0.10, 0.30, 0.20, 0.40])
P_ROW = torch.tensor([0.40, 0.15, 0.35, 0.10])
P_BONUS = torch.tensor([0.05, 0.25, 0.30, 0.40])


def test_empty_block_emits_from_the_first_row() -> None:
    rng = Rng(0)
    p = P_ROW.unsqueeze(0)
    for _ in range(20):
        verdict = BlockPolicy().decide(Block.empty(V), p, rng)
        assert verdict.accepted == () and torch.equal(verdict.row, P_ROW) and P_ROW[verdict.token] > 0


def test_one_token_blocks_are_verified_as_exact_verifies_them() -> None:
    """gamma = 1 is token-wise rejection: x ~ q, 8000 decisions per rule on the same drafts. The
    law of (accepted, emitted token) of ``block`` must fit the closed form of ``exact`` --
    accept w.p. min(1, p/q), else y ~ norm(max(p - q, 0)), bonus from p_2 -- (chi-square, ALPHA),
    as ``exact``'s own decisions do; both reject the law with the correction drawn from p (the
    fuzzy rule, TV 0.12) at 1e-6."""
    n = 8000
    p = torch.stack([P_ROW, P_BONUS])
    accept = torch.minimum(torch.ones(V), P_ROW / Q_ROW)
    reject_mass = float((Q_ROW * (1 - accept)).sum())
    resid = (P_ROW - Q_ROW).clamp(min=0) / (P_ROW - Q_ROW).clamp(min=0).sum()
    closed = np.concatenate([(reject_mass * resid).numpy(), float((Q_ROW * accept).sum()) * P_BONUS.numpy()])
    fuzzy = np.concatenate([(reject_mass * P_ROW).numpy(), float((Q_ROW * accept).sum()) * P_BONUS.numpy()])
    drafts = torch.multinomial(Q_ROW, n, replacement=True, generator=torch.Generator().manual_seed(2)).tolist()
    for policy in (BlockPolicy(), ExactPolicy()):
        rng = Rng(2)
        cells = [V * verdict.n_accepted + verdict.token
                 for verdict in (policy.decide(Block(torch.tensor([x]), Q_ROW.unsqueeze(0)), p, rng) for x in drafts)]
        observed = counts(cells, 2 * V)
        assert chisquare_pvalue(observed, closed / closed.sum()) > ALPHA, type(policy).__name__
        assert chisquare_pvalue(observed, fuzzy / fuzzy.sum()) < REJECT


def test_the_verdict_row_is_the_verifiers_full_row() -> None:
    """docs/algorithms.md, trap 1: whatever tau is, ``row`` is p[tau] itself -- never the weighted residual. 600
    decisions on a fixed 3-token block; every tau with reference probability >= 0.05 occurs."""
    q = torch.tensor([[0.4, 0.2, 0.2, 0.2], [0.2, 0.4, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]])
    p = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.3, 0.2, 0.3, 0.2], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    tokens = [0, 1, 3]
    law = reference_outcomes(tokens, q.double().numpy(), p.double().numpy())
    likely = {t for t in range(4) if sum(m for (tau, _), m in law.items() if tau == t) >= 0.05}
    assert len(likely) >= 3
    rng = Rng(5)
    seen = set()
    for _ in range(600):
        verdict = BlockPolicy().decide(Block(torch.tensor(tokens), q), p, rng)
        tau = verdict.n_accepted
        seen.add(tau)
        assert verdict.accepted == tuple(range(tau))
        assert torch.equal(verdict.row, p[tau])
    assert likely <= seen


def test_the_0_over_0_case_keeps_the_prefix() -> None:
    """w_i = 1 and Z_i = 0 (p_{i+1} = q_{i+1}: nothing left to correct) gives h_i = 1; Z_i = 0 with
    w_i < 1 gives h_i = 0. A block whose rows all equal the verifier's is always accepted whole and
    its bonus drawn from the last row, for dense, sparse and one-hot rows."""
    w = torch.tensor([1.0, 0.5, 0.5], dtype=torch.float64)
    np.testing.assert_allclose(stop_probabilities(w, torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64)).numpy(), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(stop_probabilities(w, torch.tensor([0.0, 0.2, 0.25], dtype=torch.float64)).numpy(), [1.0, 0.25 / 0.75, 0.5])
    w = torch.tensor([0.3, 0.5, 0.5], dtype=torch.float64)  # Z_i / (Z_i + 1 - w_i) away from the corner
    np.testing.assert_allclose(stop_probabilities(w, torch.tensor([0.0, 0.2, 0.25], dtype=torch.float64)).numpy(), [0.2 / 0.9, 0.25 / 0.75, 0.5])
    rng = Rng(9)
    for rows in (torch.softmax(torch.randn(5, V, generator=torch.Generator().manual_seed(1)), -1),
                 torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.2, 0.8, 0.0], [1.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 1.0]])):
        for _ in range(30):
            tokens = torch.multinomial(rows[:4], 1).squeeze(-1)
            verdict = BlockPolicy().decide(Block(tokens, rows[:4]), rows, rng)
            assert verdict.accepted == (0, 1, 2, 3) and rows[4][verdict.token] > 0


def test_a_prefix_equal_to_the_verifier_then_a_disagreement() -> None:
    """q_1 = p_1 and q_2 = p_2 (w_1 = w_2 = 1, h_1 = 1 by the 0/0 rule), then a position where the
    draft is one-hot at a token the verifier never picks (w_3 = 0): tau is always 2 and the
    correction is norm(max(p_3 - q_3, 0)) = p_3 (q_3's token has no mass under p_3)."""
    q = torch.tensor([[0.2, 0.3, 0.5, 0.0], [0.6, 0.4, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    p = torch.tensor([[0.2, 0.3, 0.5, 0.0], [0.6, 0.4, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    rng = Rng(4)
    emitted = []
    for x in ([1, 0, 3], [2, 1, 3], [0, 0, 3]):
        for _ in range(100):
            verdict = BlockPolicy().decide(Block(torch.tensor(x), q), p, rng)
            assert verdict.accepted == (0, 1) and torch.equal(verdict.row, p[2])
            emitted.append(verdict.token)
    assert set(emitted) == {0, 1}


def one_hot(i: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), V).float()


@pytest.mark.parametrize("seed", range(3))
def test_greedy_rows_accept_the_matching_prefix_and_emit_the_argmax(seed: int) -> None:
    rng = Rng(seed)
    argmax = [2, 0, 3, 1]
    p = torch.stack([one_hot(a) for a in argmax])
    for proposal, n_ok in (([2, 0, 3], 3), ([2, 0, 1], 2), ([2, 1, 3], 1), ([0, 0, 3], 0)):
        verdict = BlockPolicy().decide(Block(torch.tensor(proposal), torch.stack([one_hot(x) for x in proposal])), p, rng)
        assert verdict.accepted == tuple(range(n_ok))
        assert verdict.token == argmax[n_ok] and torch.equal(verdict.row, p[n_ok])


def test_path_weights_follow_the_clipped_recursion() -> None:
    """The log-space weights equal the loop w_i = min(1, w_{i-1} p_i/q_i), zeros included
    (p_i(x_i) = 0 makes every later weight 0; q_i(x_i) = 0 < p_i(x_i) resets the weight to 1)."""
    gen = np.random.default_rng(0)
    cases = [gen.uniform(0.01, 1.0, size=(2, 8)) for _ in range(20)]
    cases += [np.array([[0.2, 0.0, 0.9, 0.5], [0.4, 0.3, 0.1, 0.5]]), np.array([[0.2, 0.3, 0.9], [0.4, 0.0, 0.1]])]
    for px, qx in cases:
        w, expected = 1.0, []
        for a, b in zip(px, qx, strict=True):
            w = 1.0 if b == 0 and a > 0 and w > 0 else (0.0 if a == 0 else min(1.0, w * a / b))
            expected.append(w)
        got = path_weights(torch.tensor(px, dtype=torch.float32), torch.tensor(qx, dtype=torch.float32))
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-12)


def test_float64_rows_keep_their_dtype_and_device() -> None:
    q = torch.tensor([[0.1, 0.3, 0.2, 0.4]] * 3, dtype=torch.float64)
    p = torch.tensor([[0.4, 0.15, 0.35, 0.1]] * 4, dtype=torch.float64)
    verdict = BlockPolicy().decide(Block(torch.tensor([3, 1, 0]), q), p, Rng(0))
    assert verdict.row.dtype == torch.float64 and verdict.row.device == p.device


def test_binomial_sanity_of_the_whole_block_acceptance() -> None:
    """The whole block is kept with probability h_gamma = w_gamma: a fixed block of two tokens
    with p/q = 1/2 each has w_2 = 1/4 (token-wise rejection would keep it with the same 1/4, but
    through two tests). 4000 decisions: a two-sided binomial test passes 0.25 at ALPHA and
    rejects 0.30 at 1e-6."""
    q = torch.tensor([[0.8, 0.2, 0.0, 0.0], [0.8, 0.2, 0.0, 0.0]])
    p = torch.tensor([[0.4, 0.6, 0.0, 0.0], [0.4, 0.6, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    block = Block(torch.tensor([0, 0]), q)  # w_1 = 0.5, w_2 = min(1, 0.5 * 0.5) = 0.25
    rng = Rng(8)
    n = 4000
    whole = sum(BlockPolicy().decide(block, p, rng).n_accepted == 2 for _ in range(n))
    assert scipy_stats.binomtest(whole, n, 0.25).pvalue > ALPHA
    assert scipy_stats.binomtest(whole, n, 0.30).pvalue < REJECT
