"""Property-based tests (hypothesis): random Markov tables (vocabulary 2-8, zeros included),
random numbers of stages (2-5), block lengths (non-decreasing, 1-4), sampling transforms
(greedy, temperature, top-k, top-p), seeds, and every lossless policy (``exact``, ``block``,
``traversal``, with and without a token tree at the bottom) drive the real pipeline.

Invariants:
- outputs are valid tokens, exactly ``max_new_tokens`` of them (no stop tokens here), and a run
  is a function of its seed (``generate`` = ``build().propose`` with the same seed);
- the rows that come with the output are distributions, and each emitted token has positive
  probability under the target's transformed row (a lossless chain never leaves its support);
- the recursion's accounting adds up, boundary by boundary;
- greedy decoding equals the target's own argmax path;
- exactness: in each example, a list of random cases is sampled (pairs of tokens) and the
  per-case chi-square statistics against the exact pair law are pooled into one test, which
  must pass at ``stats.ALPHA``; the same pooled test rejects a lossy policy (negative control).

Profiles (``PYRAMID_HYPOTHESIS_PROFILE``): ``ci`` (default: derandomised, bounded examples, well
under a minute on a 2-core CPU) and ``stress`` (ten times the examples, random; ``nox -s
stress``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import pytest
import stats
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from pyramid_core import Pipeline, SamplingConfig, build_pipeline
from pyramid_core.rng import Rng
from pyramid_core.testing import TableModel

settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("stress", max_examples=1000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("PYRAMID_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
SCALE = 10 if PROFILE == "stress" else 1

LOSSLESS = ("exact", "block", "traversal")
TREE_POLICIES = ("exact", "traversal")
TREES = ("tree:branching=2", "tree:branching=2-1,replacement=false", "tree:budget=4,branching=3",
         "tree:branching=3-2,replacement=false")


@attrs.frozen
class Case:
    """One random pipeline: Markov tables (row = the last token), smallest first, the target last."""

    vocab: int
    tables: tuple[tuple[tuple[float, ...], ...], ...]
    lengths: tuple[int, ...]
    policies: tuple[str, ...]
    sampling: SamplingConfig
    tree: str | None
    prompt: tuple[int, ...]
    seed: int

    def pipeline(self, policies: Sequence[str] | None = None) -> Pipeline:
        stages = [TableModel(lambda ctx, t=t: t[ctx[-1]], vocab_size=self.vocab, name=f"M{i + 1}")
                  for i, t in enumerate(self.tables)]
        return build_pipeline(stages, list(policies or self.policies), list(self.lengths), sampling=self.sampling,
                              stop_ids=[], tree=self.tree)

    def target_matrix(self) -> np.ndarray:
        """The target's transformed rows, ``[last token] -> next-token distribution``, computed
        from the logits the target stage returns (float32, as in the pipeline: a top-p cut at a
        near-tie must fall where the pipeline's falls)."""
        target = self.pipeline().target
        logits = torch.cat([target.score(torch.tensor([x])) for x in range(self.vocab)])
        return self.sampling.transform(logits).double().numpy()


@st.composite
def markov(draw: st.DrawFn, vocab: int) -> tuple[tuple[float, ...], ...]:
    rows = []
    for _ in range(vocab):
        weights = draw(st.lists(st.integers(0, 4), min_size=vocab, max_size=vocab))
        weights[draw(st.integers(0, vocab - 1))] += 1  # at least one token with mass; zeros stay
        total = sum(weights)
        rows.append(tuple(w / total for w in weights))
    return tuple(rows)


@st.composite
def samplings(draw: st.DrawFn, vocab: int, greedy: bool | None = None) -> SamplingConfig:
    if greedy is None:
        greedy = draw(st.booleans())
    if greedy:
        return SamplingConfig.greedy()
    return SamplingConfig(temperature=draw(st.sampled_from([0.5, 1.0, 1.5])),
                          top_k=draw(st.sampled_from([0, 1, 2, vocab])),
                          top_p=draw(st.sampled_from([1.0, 0.9, 0.6])))


@st.composite
def cases(draw: st.DrawFn, *, greedy: bool | None = None, max_stages: int = 5) -> Case:
    vocab = draw(st.integers(2, 8))
    n = draw(st.integers(2, max_stages))
    tables = tuple(draw(markov(vocab)) for _ in range(n))
    lengths = tuple(sorted(draw(st.lists(st.integers(1, 4), min_size=n - 1, max_size=n - 1))))
    policies = [draw(st.sampled_from(LOSSLESS)) for _ in range(n - 1)]
    tree = draw(st.none() | st.sampled_from(TREES))
    if tree is not None:
        policies[0] = draw(st.sampled_from(TREE_POLICIES))
    prompt = tuple(draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=3)))
    return Case(vocab, tables, lengths, tuple(policies), draw(samplings(vocab, greedy)), tree, prompt,
                draw(st.integers(0, 2**31 - 1)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- invariants of every run -----------------------------------------------------------------------


@settings(max_examples=200 * SCALE)
@given(case=cases(), new_tokens=st.integers(1, 9))
def test_outputs_rows_and_accounting(case: Case, new_tokens: int) -> None:
    pipe = case.pipeline()
    gen = pipe.generate(list(case.prompt), new_tokens, seed=case.seed)
    tokens = gen.token_list
    assert len(tokens) == new_tokens and all(0 <= t < case.vocab for t in tokens)

    # a function of the seed, and the rows it comes with are the target's, distributions, with mass on
    # the emitted tokens
    proposer, _ = pipe.build()
    block = proposer.propose(torch.tensor(case.prompt), new_tokens, Rng(case.seed))
    assert block.tokens.tolist() == tokens
    rows = block.rows.double()
    assert torch.all(rows >= 0) and torch.allclose(rows.sum(-1), torch.ones(len(tokens), dtype=torch.float64),
                                                   atol=1e-5)
    assert torch.all(rows[torch.arange(len(tokens)), block.tokens] > 0)
    target = case.target_matrix()
    last = [case.prompt[-1], *tokens[:-1]]
    assert all(target[a, t] > 0 for a, t in zip(last, tokens)), "left the target's support"

    # the accounting, boundary by boundary (k = 0 is boundary 1 -> 2)
    m = gen.metrics
    for k, b in enumerate(m.boundaries):
        assert sum(b.accepted_hist) == b.rounds and sum(i * c for i, c in enumerate(b.accepted_hist)) == b.accepted
        assert sum(b.proposed_at) == b.proposed and sum(b.accepted_at) == b.accepted
        assert b.accepted <= b.proposed and b.accepted <= b.tries <= b.accepted + b.rounds
        assert b.rounds == m.stages[k + 1].forwards  # one verification forward per round
        if k + 1 < len(m.boundaries):  # what stage k+2 emitted, cut to what stage k+3 asked for
            up = m.boundaries[k + 1]
            made = b.accepted + b.rounds
            assert made - up.rounds <= up.proposed <= made
    top = m.boundaries[-1]
    assert m.new_tokens == new_tokens and new_tokens in (top.accepted + top.rounds, top.accepted + top.rounds - 1)
    bottom = m.boundaries[0]
    if case.tree is None:
        assert m.stages[0].forwards == bottom.proposed  # the bottom drafts one token per forward
    else:
        assert bottom.tree_rounds == bottom.rounds and bottom.tree_nodes >= bottom.proposed


@settings(max_examples=150 * SCALE)
@given(case=cases(greedy=True), new_tokens=st.integers(1, 12))
def test_greedy_is_the_targets_argmax_path(case: Case, new_tokens: int) -> None:
    tokens = case.pipeline().generate(list(case.prompt), new_tokens, seed=case.seed).token_list
    matrix = np.asarray(case.tables[-1])
    expected, last = [], case.prompt[-1]
    for _ in range(new_tokens):
        last = int(np.argmax(matrix[last]))  # first index on ties, as torch.argmax
        expected.append(last)
    assert tokens == expected


# --- exactness, pooled over many random cases -----------------------------------------------------

RUNS_PER_CASE = 120


def _case_statistic(case: Case, policies: Sequence[str] | None = None, runs: int = RUNS_PER_CASE) -> tuple[float, int]:
    """(chi-square statistic, degrees of freedom) of ``runs`` sampled pairs (x1, x2) against the
    exact pair law p(x1) T(x1, x2) of the target; cells with expected counts below 5 pooled."""
    pipe = case.pipeline(policies)
    matrix = case.target_matrix()
    law = (matrix[case.prompt[-1]][:, None] * matrix).ravel()
    counts = np.zeros(law.size)
    for i in range(runs):
        a, b = pipe.generate(list(case.prompt), 2, seed=case.seed + i).token_list
        counts[a * case.vocab + b] += 1
    if counts[law <= 0].sum():
        return math.inf, 1
    keep = law > 0
    obs, expected = counts[keep], runs * law[keep] / law[keep].sum()
    order = np.argsort(expected, kind="stable")
    obs, expected = list(obs[order]), list(expected[order])
    while len(expected) > 1 and expected[0] < 5:  # pool the smallest cell into the next smallest
        o0, e0 = obs.pop(0), expected.pop(0)
        obs[0] += o0
        expected[0] += e0
        order = np.argsort(expected, kind="stable")
        obs, expected = [obs[j] for j in order], [expected[j] for j in order]
    if len(expected) < 2:
        return 0.0, 0
    o, e = np.asarray(obs), np.asarray(expected)
    return float(((o - e) ** 2 / e).sum()), len(expected) - 1


def _pooled_p(pairs: Sequence[tuple[float, int]]) -> float:
    statistic, dof = sum(s for s, _ in pairs), sum(d for _, d in pairs)
    return 1.0 if dof == 0 else float(scipy_stats.chi2.sf(statistic, dof))


@settings(max_examples=8 * SCALE)
@given(batch=st.lists(cases(greedy=False, max_stages=4), min_size=12, max_size=12))
def test_every_lossless_pipeline_is_exact_pooled_chi_square(batch: list[Case]) -> None:
    """12 random sampled cases per example, 120 runs each (1,440 pairs): the pooled statistic
    (sum of the per-case chi-squares, degrees of freedom summed) must pass at ALPHA."""
    p = _pooled_p([_case_statistic(case) for case in batch])
    assert p > stats.ALPHA, p


def test_the_pooled_chi_square_rejects_a_lossy_policy() -> None:
    """Negative control: ``fuzzy`` (tau 0.5 on TV) at every boundary of 2-stage cases whose
    draft is far from the target, same sample sizes: rejected at REJECT."""
    rng = np.random.default_rng(0)
    batch = []
    for i in range(12):
        vocab = 4
        target = rng.dirichlet(np.full(vocab, 0.7), size=vocab)
        draft = np.roll(target, 1, axis=1)  # the target's rows, shifted: far from it
        batch.append(Case(vocab, (tuple(map(tuple, draft)), tuple(map(tuple, target))), (3,), ("exact",),
                          SamplingConfig(), None, (0,), 1000 * i))
    exact = _pooled_p([_case_statistic(c) for c in batch])
    lossy = _pooled_p([_case_statistic(c, ["fuzzy:div=tv,tau=0.5"]) for c in batch])
    assert exact > stats.ALPHA and lossy < stats.REJECT, (exact, lossy)
