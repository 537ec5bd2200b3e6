"""Chi-square exactness of whole pipelines over ``TableModel`` stages (docs/algorithms.md "The exact N-stage chain").

With ``exact`` at every boundary, the generated tokens must be an exact sample of the target
M_N, for any number of stages and any block lengths. Every test below states its sample size;
a lossless configuration must give p > ALPHA = 1e-4, and every test also shows its power: the
same samples reject (p < 1e-6) the distribution of the stage below the target, and the
deliberately wrong chains of the two traps of docs/algorithms.md are rejected by the very same checks.

Tables: neighbouring stages differ by a total variation of 0.2-0.5 (checked below), so every
boundary both accepts and rejects often.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
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

from pyramid_core import Block, Pipeline, Rng, SamplingConfig, build_pipeline
from pyramid_core.pipeline import AutoregressiveProposer, SpeculativeProposer, StageVerifier
from pyramid_core.protocols import Proposer
from pyramid_core.schedule import FixedLength
from pyramid_core.testing import TableModel
from pyramid_core.types import BoundaryStats, StageStats
from pyramid_plugins.exact import ExactPolicy

V = 4

# Context-free tables, smallest stage first; the last one is the target.
FIXED = [
    [0.10, 0.30, 0.20, 0.40],
    [0.35, 0.10, 0.45, 0.10],
    [0.15, 0.45, 0.25, 0.15],
    [0.40, 0.30, 0.20, 0.10],
]

# Markov tables: row a is the next-token distribution after last token a. Smallest stage first.
MARKOV = [
    [[0.35, 0.35, 0.10, 0.20], [0.25, 0.25, 0.25, 0.25], [0.40, 0.20, 0.30, 0.10], [0.10, 0.15, 0.25, 0.50]],
    [[0.10, 0.30, 0.45, 0.15], [0.60, 0.10, 0.20, 0.10], [0.25, 0.45, 0.10, 0.20], [0.20, 0.35, 0.25, 0.20]],
    [[0.25, 0.40, 0.15, 0.20], [0.30, 0.30, 0.30, 0.10], [0.10, 0.30, 0.40, 0.20], [0.55, 0.15, 0.10, 0.20]],
    [[0.50, 0.25, 0.15, 0.10], [0.10, 0.50, 0.30, 0.10], [0.20, 0.10, 0.20, 0.50], [0.30, 0.30, 0.30, 0.10]],
]

# (number of stages, block lengths): every boundary at 1, every boundary at 3, and a mix
CONFIGS = [(2, [1]), (2, [3]), (3, [1, 1]), (3, [3, 3]), (4, [1, 1, 1]), (4, [3, 3, 3]), (4, [1, 2, 3])]
CONFIG_IDS = [f"N{n}-ell{''.join(map(str, ells))}" for n, ells in CONFIGS]

PROMPT = [1, 2]  # last token 2


def fixed_stages(n: int, tables: Sequence[Sequence[float]] = FIXED) -> list[TableModel]:
    return [TableModel(t, name=f"M{i + 1}") for i, t in enumerate(tables[len(tables) - n :])]


def markov_fn(matrix: Sequence[Sequence[float]]) -> Callable[[tuple[int, ...]], Sequence[float]]:
    return lambda ctx: matrix[ctx[-1]]


def markov_stages(n: int, tables: Sequence[Sequence[Sequence[float]]] = MARKOV) -> list[TableModel]:
    return [TableModel(markov_fn(t), vocab_size=V, name=f"M{i + 1}") for i, t in enumerate(tables[len(tables) - n :])]


def exact_pipeline(stages: Sequence[TableModel | Proposer], ells: Sequence[int], **kw: object) -> Pipeline:
    return build_pipeline(list(stages), ["exact"] * (len(stages) - 1), list(ells), **kw)  # type: ignore[arg-type]


def markov_joint(matrix: Sequence[Sequence[float]], last: int, length: int) -> np.ndarray:
    """``Float[ndarray, "V**length"]``: probability of every token sequence (base-V index)."""
    m = np.asarray(matrix, dtype=float)
    probs = np.empty(V**length)
    for i, seq in enumerate(itertools.product(range(V), repeat=length)):
        prev, pr = last, 1.0
        for x in seq:
            pr *= m[prev, x]
            prev = x
        probs[i] = pr
    return probs


def sequence_index(samples: np.ndarray) -> np.ndarray:
    """Base-V index of each row of ``Long[ndarray, "runs length"]`` (matches ``markov_joint``)."""
    return (samples * V ** np.arange(samples.shape[1] - 1, -1, -1)).sum(1)


def test_tables_differ_between_neighbouring_stages() -> None:
    """Acceptance must be neither ~0 nor ~1 at every boundary for the tests to mean anything."""
    for a, b in itertools.pairwise(FIXED):
        assert 0.2 <= tv(a, b) <= 0.5
    for a, b in itertools.pairwise(MARKOV):
        for row_a, row_b in zip(a, b, strict=True):
            assert 0.2 <= tv(row_a, row_b) <= 0.5


def test_chisquare_helper_rejects_impossible_tokens_and_merges_small_cells() -> None:
    assert chisquare_pvalue([10, 0, 1], [0.5, 0.5, 0.0]) == 0.0  # a token of probability 0 seen
    assert chisquare_pvalue([50, 50, 0], [0.5, 0.5, 0.0]) == pytest.approx(1.0)
    # 1000 draws; the three rare categories (expected 4, 3, 3) are pooled into one cell of 10
    rare = [0.5, 0.49, 0.004, 0.003, 0.003]
    assert chisquare_pvalue([500, 490, 4, 3, 3], rare) == pytest.approx(1.0)
    assert chisquare_pvalue([500, 490, 2, 5, 3], rare) == pytest.approx(1.0)  # only the sum counts
    assert chisquare_pvalue([500, 470, 10, 10, 10], rare) < REJECT


# ----------------------------------------------------------------------------------------------
# (a) context-free tables: the first token, and all positions pooled
# ----------------------------------------------------------------------------------------------

FIXED_RUNS, FIXED_LENGTH = 2000, 4


def fixed_samples(generate: Callable[[int], torch.Tensor]) -> np.ndarray:
    """FIXED_RUNS = 2000 seeded runs of FIXED_LENGTH = 4 tokens."""
    return sample_positions(generate, FIXED_RUNS, FIXED_LENGTH)


def fixed_pvalues(samples: np.ndarray, target: Sequence[float]) -> tuple[float, float]:
    """(p of the first token, p of all positions pooled) against ``target``: 2000 first tokens
    and 8000 pooled tokens. With a context-free target an exact sample is i.i.d. ``target`` at
    every position, so pooling is valid under the null hypothesis."""
    return chisquare_pvalue(counts(samples[:, 0], V), target), chisquare_pvalue(counts(samples, V), target)


@pytest.mark.parametrize(("n", "ells"), CONFIGS, ids=CONFIG_IDS)
def test_first_token_matches_the_target_table(n: int, ells: list[int]) -> None:
    """2000 runs x 4 tokens (see ``fixed_pvalues``): the first token and the pooled tokens fit the
    target's table at ALPHA; the pooled tokens reject the table of the stage below (TV 0.25) at
    1e-6."""
    pipe = exact_pipeline(fixed_stages(n), ells)
    samples = fixed_samples(lambda s: pipe.generate(PROMPT, FIXED_LENGTH, seed=s).tokens)
    p_first, p_pooled = fixed_pvalues(samples, FIXED[-1])
    assert p_first > ALPHA
    assert p_pooled > ALPHA
    assert fixed_pvalues(samples, FIXED[-2])[1] < REJECT


# ----------------------------------------------------------------------------------------------
# (b) context-dependent (Markov) tables: the third generated token and the joint sequence
# ----------------------------------------------------------------------------------------------

MARKOV_RUNS, MARKOV_LENGTH = 3000, 3


def third_token_pvalue(samples: np.ndarray, target: Sequence[Sequence[float]]) -> float:
    """Chi-square of the 3rd generated token against e_last T^3 (T: ``target``'s matrix)."""
    third = markov_marginal(np.asarray(target), PROMPT[-1], MARKOV_LENGTH)
    return chisquare_pvalue(counts(samples[:, -1], V), third)


def joint_pvalue(samples: np.ndarray, target: Sequence[Sequence[float]]) -> float:
    """Chi-square of the whole 3-token sequence against the chain's 64 sequence probabilities
    (cells with expected count < 5 merged)."""
    joint = markov_joint(target, PROMPT[-1], MARKOV_LENGTH)
    return chisquare_pvalue(counts(sequence_index(samples), V**MARKOV_LENGTH), joint)


def test_markov_marginal_is_propagated_from_the_prompt() -> None:
    fn = markov_fn(MARKOV[-1])
    t = markov_matrix(fn, V)
    np.testing.assert_allclose(markov_marginal(t, 2, 1), MARKOV[-1][2])
    np.testing.assert_allclose(markov_marginal(t, 2, 3), np.asarray(MARKOV[-1][2]) @ t @ t)
    joint = markov_joint(MARKOV[-1], 2, 3)
    assert joint.sum() == pytest.approx(1.0)
    # the third token's marginal is the joint summed over the first two tokens
    np.testing.assert_allclose(joint.reshape(V * V, V).sum(0), markov_marginal(t, 2, 3))


@pytest.mark.parametrize(("n", "ells"), [(1, []), *CONFIGS], ids=["N1", *CONFIG_IDS])
def test_later_position_matches_the_propagated_markov_marginal(n: int, ells: list[int]) -> None:
    """3000 seeded runs of 3 tokens after prompt [1, 2]. The 3rd token must fit e_2 T_N^3 and the
    whole sequence the target chain's sequence probabilities (chi-square, ALPHA); the sequences
    reject the chain of the stage below the target at 1e-6. N=1 is plain sampling (baseline)."""
    pipe = exact_pipeline(markov_stages(n), ells)
    samples = sample_positions(lambda s: pipe.generate(PROMPT, MARKOV_LENGTH, seed=s).tokens, MARKOV_RUNS, MARKOV_LENGTH)
    assert third_token_pvalue(samples, MARKOV[-1]) > ALPHA
    assert joint_pvalue(samples, MARKOV[-1]) > ALPHA
    assert joint_pvalue(samples, MARKOV[-2]) < REJECT


# ----------------------------------------------------------------------------------------------
# Negative controls: the two traps of docs/algorithms.md, in a chain built by hand
# ----------------------------------------------------------------------------------------------


class DraftRowsProposer(SpeculativeProposer):
    """TRAP 1 (wrong on purpose): the accepted tokens travel up with the *proposal* rows (those of
    the stage below, ultimately P_1) instead of the rows of the stage that accepted them."""

    def round(self, context: torch.Tensor, budget: int, rng: Rng) -> Block:
        block = self.lower.propose(context, min(self.schedule.length(), budget), rng)
        p = self.verifier.verify(context, block)
        verdict = self.policy.decide(block, p, rng)
        self.stats.record(len(block), verdict.n_accepted)
        accepted = list(verdict.accepted)
        tokens = torch.cat([block.tokens[accepted], torch.tensor([verdict.token])])
        rows = torch.cat([block.rows[accepted], verdict.row.unsqueeze(0)])  # BUG: block.rows
        return Block(tokens, rows)


class AcceptedOnlyBuffering(SpeculativeProposer):
    """TRAP 2 (wrong on purpose): what it buffers depends on acceptance. When a round accepted
    some tokens and then rejected one, it keeps only the accepted tokens and drops the correction
    (to be redrawn next round), so a buffered token at a later position is more likely an
    accepted draft token than an exact sample of this stage."""

    def round(self, context: torch.Tensor, budget: int, rng: Rng) -> Block:
        block = self.lower.propose(context, min(self.schedule.length(), budget), rng)
        p = self.verifier.verify(context, block)
        verdict = self.policy.decide(block, p, rng)
        self.stats.record(len(block), verdict.n_accepted)
        accepted = list(verdict.accepted)
        if 0 < verdict.n_accepted < len(block):  # BUG: drop the correction after a rejection
            return Block(block.tokens[accepted], p[accepted])
        tokens = torch.cat([block.tokens[accepted], torch.tensor([verdict.token])])
        return Block(tokens, torch.cat([p[accepted], verdict.row.unsqueeze(0)]))


def hand_built(stages: Sequence[TableModel], ells: Sequence[int], middle: type[SpeculativeProposer]) -> Callable[[int, int], torch.Tensor]:
    """Mirror ``Pipeline.build``, with ``middle`` as every proposer below the target (the target's
    own proposer is always the library's ``SpeculativeProposer``). Returns generate(seed, n)."""
    sampling = SamplingConfig()

    def generate(seed: int, n: int) -> torch.Tensor:
        proposer: Proposer = AutoregressiveProposer(stages[0], sampling, StageStats("M1"))
        for k in range(1, len(stages)):
            cls = SpeculativeProposer if k == len(stages) - 1 else middle
            verifier = StageVerifier(stages[k], sampling, StageStats(f"M{k + 1}"))
            proposer = cls(proposer, verifier, ExactPolicy(), FixedLength(ells[k - 1]), BoundaryStats())
        return proposer.propose(torch.tensor(PROMPT), n, Rng(seed)).tokens

    return generate


def test_hand_built_chain_is_the_pipeline() -> None:
    """The negative controls below differ from the library only by their bug: built with the
    library's own ``SpeculativeProposer``, the hand-built chain is token-identical to Pipeline."""
    stages = markov_stages(4)
    pipe = exact_pipeline(stages, [1, 2, 3])
    generate = hand_built(stages, [1, 2, 3], SpeculativeProposer)
    for seed in range(30):
        assert generate(seed, 6).tolist() == pipe.generate(PROMPT, 6, seed=seed).token_list


@pytest.mark.parametrize(("n", "ells"), [(3, [1, 1]), (4, [1, 2, 3])], ids=["N3-ell11", "N4-ell123"])
def test_trap1_proposal_rows_at_the_target_boundary_are_detected(n: int, ells: list[int]) -> None:
    """The test of (a) -- 2000 runs x 4 tokens against the target table, which the correct chain
    passes (``test_first_token_matches_the_target_table`` with the same configuration and seeds,
    and ``test_hand_built_chain_is_the_pipeline``) -- rejects (p < 1e-6) the chain whose accepted
    tokens carry the draft's rows to the target boundary (first-token TV about 0.12)."""
    stages = fixed_stages(n)
    bad = fixed_pvalues(fixed_samples(lambda s: hand_built(stages, ells, DraftRowsProposer)(s, FIXED_LENGTH)), FIXED[-1])
    assert bad[0] < REJECT
    assert bad[1] < REJECT


def test_trap1_is_detected_with_markov_tables() -> None:
    """The joint-sequence test of (b) (3000 runs x 3 tokens) rejects the trap-1 chain at 1e-6."""
    stages = markov_stages(3)
    samples = sample_positions(lambda s: hand_built(stages, [1, 1], DraftRowsProposer)(s, MARKOV_LENGTH), MARKOV_RUNS, MARKOV_LENGTH)
    assert joint_pvalue(samples, MARKOV[-1]) < REJECT


# Tables for trap 2: the draft and the qualifier disagree a lot (TV 0.5, the qualifier's residual
# is far from its row) and the target is close to the qualifier (TV 0.2), so a bias in what the
# qualifier buffers passes through the target boundary (TV about 0.1 at positions 2-4).
TRAP2_TABLES = [[0.0, 0.5, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0], [0.4, 0.4, 0.1, 0.1]]


def later_positions_pvalue(generate: Callable[[int], torch.Tensor]) -> float:
    """2000 runs x 4 tokens, positions 2-4 pooled (6000 tokens; i.i.d. target under the null
    hypothesis), chi-square against the target's table."""
    samples = sample_positions(generate, 2000, 4)
    return chisquare_pvalue(counts(samples[:, 1:], V), TRAP2_TABLES[-1])


def test_trap2_acceptance_dependent_buffering_is_detected() -> None:
    """Positions 2-4 pooled (see ``later_positions_pvalue``): the correct 3-stage chain with
    block lengths [4, 4] passes at ALPHA, the chain whose qualifier drops corrections after a
    partial acceptance is rejected at 1e-6."""
    stages = fixed_stages(3, TRAP2_TABLES)
    assert tv(TRAP2_TABLES[0], TRAP2_TABLES[1]) == pytest.approx(0.5)
    assert tv(TRAP2_TABLES[1], TRAP2_TABLES[2]) == pytest.approx(0.2)
    assert later_positions_pvalue(lambda s: hand_built(stages, [4, 4], SpeculativeProposer)(s, 4)) > ALPHA
    assert later_positions_pvalue(lambda s: hand_built(stages, [4, 4], AcceptedOnlyBuffering)(s, 4)) < REJECT


# ----------------------------------------------------------------------------------------------
# One-hot proposals (ngram), stop tokens, and the sampling transform
# ----------------------------------------------------------------------------------------------

NGRAM_PROMPT = [0, 1, 2, 3, 0, 1, 2, 3, 0, 2]  # repetitive, so prompt lookup finds matches


@pytest.mark.parametrize(("middle", "ells"), [(0, [3]), (1, [2, 2])], ids=["ngram-target", "ngram-M3-target"])
def test_ngram_proposer_with_exact_policy_stays_exact(middle: int, ells: list[int]) -> None:
    """ngram drafts one-hot rows; with ``exact`` the output is still the target's Markov chain.
    3000 runs x 3 tokens after a repetitive prompt ending in 2: the joint sequence fits the
    target chain (ALPHA) and rejects the chain of M3 (the table below the target) at 1e-6."""
    targets = markov_stages(1 + middle)
    pipe = build_pipeline(["ngram", *targets], ["exact"] * (1 + middle), ells)
    proposed = accepted = 0

    def generate(seed: int) -> torch.Tensor:
        nonlocal proposed, accepted
        gen = pipe.generate(NGRAM_PROMPT, MARKOV_LENGTH, seed=seed)
        proposed += gen.metrics.boundaries[0].proposed
        accepted += gen.metrics.boundaries[0].accepted
        return gen.tokens

    samples = sample_positions(generate, MARKOV_RUNS, MARKOV_LENGTH)
    assert 0.1 < accepted / proposed < 0.9, "ngram proposals must be both accepted and rejected"
    assert NGRAM_PROMPT[-1] == PROMPT[-1]
    assert third_token_pvalue(samples, MARKOV[-1]) > ALPHA
    assert joint_pvalue(samples, MARKOV[-1]) > ALPHA
    assert joint_pvalue(samples, MARKOV[-2]) < REJECT


def lookup_samples(pipe: Pipeline) -> tuple[np.ndarray, Counter[str]]:
    """``MARKOV_RUNS`` generations after ``NGRAM_PROMPT`` through a pipeline with a lookup: the
    sampled positions, and the lookup's tries and hits, stage 1's forwards and the tree rounds
    at the bottom boundary, summed."""
    counts: Counter[str] = Counter()

    def generate(seed: int) -> torch.Tensor:
        gen = pipe.generate(NGRAM_PROMPT, MARKOV_LENGTH, seed=seed)
        assert gen.metrics.lookup is not None
        counts.update(hits=gen.metrics.lookup.hits, tries=gen.metrics.lookup.tries,
                      drafted=gen.metrics.stages[0].forwards, tree_rounds=gen.metrics.boundaries[0].tree_rounds)
        return gen.tokens

    samples = sample_positions(generate, MARKOV_RUNS, MARKOV_LENGTH)
    assert 0.1 < counts["hits"] / counts["tries"] < 0.9, f"the lookup must propose in some rounds and not in others ({counts})"
    return samples, counts


@pytest.mark.parametrize(("middle", "ells"), [(0, [3]), (1, [2, 3])], ids=["lookup-M3-target", "lookup-M2-M3-target"])
def test_a_lookup_in_front_of_a_model_draft_stays_exact(middle: int, ells: list[int]) -> None:
    """``lookup="ngram:min_ngram=2"``: each round prompt lookup proposes first (one-hot rows) and the Markov
    draft M2 samples only where it finds nothing -- both kinds of round must occur. 3000 runs x 3
    tokens after a repetitive prompt: the joint sequence fits the target chain (ALPHA) and rejects
    the chain of the stage below the target at 1e-6."""
    samples, counts = lookup_samples(exact_pipeline(markov_stages(2 + middle), ells, lookup="ngram:min_ngram=2"))
    assert counts["drafted"] > MARKOV_RUNS / 4, "the draft must draft in the rounds the lookup leaves"
    assert joint_pvalue(samples, MARKOV[-1]) > ALPHA
    assert third_token_pvalue(samples, MARKOV[-1]) > ALPHA
    assert joint_pvalue(samples, MARKOV[-2]) < REJECT


@pytest.mark.parametrize(("policy", "tree"), [("exact", None), ("exact", "tree:branching=2-1"),
                                              ("exact", "tree:budget=5,beam=2,branching=2"),
                                              ("traversal", "tree:branching=2-1")],
                         ids=["graft-chain", "graft-tree", "graft-dynamic-tree", "graft-tree-traversal"])
def test_a_lookup_grafted_beside_the_draft_stays_exact(policy: str, tree: str | None) -> None:
    """``lookup_graft``: every round the Markov draft M2 drafts (a chain, or a token tree drawn
    with replacement) and prompt lookup's one-hot block is added as a path of its own, tried
    first; the tree rule (multi-candidate rejection sampling, or traversal verification) verifies
    both in one forward. 3000 runs x 3 tokens after a repetitive prompt: the joint sequence fits
    the target chain (ALPHA) and rejects M2's chain at 1e-6; grafted rounds must occur. (Letting
    the lookup's path share a drafted node, as greedy decoding does, fails the chain case.)"""
    pipe = build_pipeline(markov_stages(2), [policy], [3], lookup="ngram:min_ngram=2", lookup_graft=True, tree=tree)
    samples, counts = lookup_samples(pipe)
    assert counts["tree_rounds"] >= counts["hits"] > MARKOV_RUNS / 5, "grafted rounds must verify a tree"
    assert joint_pvalue(samples, MARKOV[-1]) > ALPHA
    assert third_token_pvalue(samples, MARKOV[-1]) > ALPHA
    assert joint_pvalue(samples, MARKOV[-2]) < REJECT


def stopped_sequence_probs(matrix: Sequence[Sequence[float]], last: int, length: int, stop: int) -> dict[tuple[int, ...], float]:
    """Probability of every output of ``length`` tokens that ends right after the first ``stop``."""
    out: dict[tuple[int, ...], float] = {}

    def walk(prefix: tuple[int, ...], prev: int, pr: float) -> None:
        if len(prefix) == length or (prefix and prefix[-1] == stop):
            out[prefix] = pr
            return
        for x in range(V):
            walk((*prefix, x), x, pr * matrix[prev][x])

    walk((), last, 1.0)
    return out


def test_stop_tokens_keep_the_chain_exact() -> None:
    """Stop token 3 (probability 0.1-0.5 per step): every stage stops buffering right after it.
    3000 runs of up to 3 tokens (N=3, block lengths [2, 3]); the distribution over the 40
    possible outputs must fit the target chain stopped at 3 (ALPHA) and reject M3's at 1e-6."""
    stages = markov_stages(3)
    pipe = exact_pipeline(stages, [2, 3], stop_ids=[3])
    expected = stopped_sequence_probs(MARKOV[-1], PROMPT[-1], MARKOV_LENGTH, stop=3)
    below = stopped_sequence_probs(MARKOV[-2], PROMPT[-1], MARKOV_LENGTH, stop=3)
    index = {seq: i for i, seq in enumerate(expected)}
    observed = np.zeros(len(index))
    for seed in range(MARKOV_RUNS):
        observed[index[tuple(pipe.generate(PROMPT, MARKOV_LENGTH, seed=seed).token_list)]] += 1
    assert len(expected) == 1 + 3 + 3 * 3 * 4 and sum(expected.values()) == pytest.approx(1.0)
    assert chisquare_pvalue(observed, list(expected.values())) > ALPHA
    assert chisquare_pvalue(observed, [below[s] for s in expected]) < REJECT


SAMPLING_TABLES = [
    [0.05, 0.10, 0.15, 0.20, 0.25, 0.25],
    [0.20, 0.05, 0.30, 0.05, 0.15, 0.25],
    [0.30, 0.22, 0.18, 0.14, 0.10, 0.06],
]


@pytest.mark.parametrize(
    "sampling",
    [SamplingConfig(temperature=0.7), SamplingConfig(top_k=3), SamplingConfig(top_p=0.8),
     SamplingConfig(temperature=1.5, top_k=5, top_p=0.9)],
    ids=["T0.7", "top_k3", "top_p0.8", "T1.5-k5-p0.9"],
)
def test_output_follows_the_targets_transformed_table(sampling: SamplingConfig) -> None:
    """N=3, block lengths [2, 2], context-free tables over 6 tokens. 2000 runs x 3 tokens pooled
    (6000 tokens, i.i.d. under the null hypothesis) must fit ``sampling.transform`` of the
    target's log-table (ALPHA) and reject the untransformed table (TV >= 0.07) at 1e-6."""
    stages = [TableModel(t, name=f"M{i + 1}") for i, t in enumerate(SAMPLING_TABLES)]
    pipe = exact_pipeline(stages, [2, 2], sampling=sampling)
    target = torch.tensor(SAMPLING_TABLES[-1])
    expected = sampling.transform(target.log().unsqueeze(0))[0].double().numpy()
    expected /= expected.sum()
    assert tv(expected, SAMPLING_TABLES[-1]) >= 0.07
    samples = sample_positions(lambda s: pipe.generate([0], 3, seed=s).tokens, 2000, 3)
    assert chisquare_pvalue(counts(samples, 6), expected) > ALPHA
    assert chisquare_pvalue(counts(samples, 6), SAMPLING_TABLES[-1]) < REJECT
