"""``ExactPolicy.decide`` on explicit probability vectors -- no model involved.

docs/algorithms.md "The exact N-stage chain": accept x_j with probability min(1, p_j(x_j)/q_j(x_j)); at the first
rejection emit y ~ norm(max(p_j - q_j, 0)); if all are accepted emit a bonus y ~ p_{n+1}; the row
that travels up with the emitted token is the verifier's full row p_j (trap 1).

(Token trees have their own tests; here only a chain written as a tree.)

Statistical tests draw from one seeded ``Rng`` per test, state their sample size, pass when the
binomial / chi-square p-value is > ALPHA = 1e-4, and each checks its own power: the same samples
must reject (p < 1e-6) a nearby wrong answer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from stats import ALPHA, REJECT, chisquare_pvalue, counts, tv

from pyramid_core import Block, Rng, Verdict
from pyramid_plugins.exact import ExactPolicy, residual

# proposer row q and verifier rows for a one-token block; p(x)/q(x) = 4, 0.5, 1.75, 0.25
Q = torch.tensor([0.10, 0.30, 0.20, 0.40])
P0 = torch.tensor([0.40, 0.15, 0.35, 0.10])
P1 = torch.tensor([0.05, 0.25, 0.30, 0.40])  # the bonus row, deliberately unlike P0
V = 4


def one_token_block(x: int, q: torch.Tensor = Q) -> Block:
    return Block(torch.tensor([x]), q.unsqueeze(0))


def test_fixture_rows_really_differ() -> None:
    # the tests below only have power if q and p are far apart (TV 0.45) and the residual is
    # far from p (TV 0.27)
    assert tv(Q, P0) == pytest.approx(0.45)
    assert tv(residual(P0, Q), P0) > 0.25


@pytest.mark.parametrize("x", range(V))
def test_single_token_accepted_with_probability_min_1_p_over_q(x: int) -> None:
    """4000 decisions on the fixed block [x]; the acceptance count must pass a two-sided binomial
    test against min(1, p(x)/q(x)) at ALPHA, and reject a rate 0.05 away at 1e-6."""
    n = 4000
    rate = min(1.0, float(P0[x] / Q[x]))
    p = torch.stack([P0, P1])
    rng = Rng(100 + x)
    block = one_token_block(x)
    accepted = sum(ExactPolicy().decide(block, p, rng).n_accepted for _ in range(n))
    if rate == 1.0:
        assert accepted == n  # p(x) >= q(x): never rejected
        return
    assert scipy_stats.binomtest(accepted, n, rate).pvalue > ALPHA
    # power: a rate 0.05 off is rejected by the same test on the same sample
    assert scipy_stats.binomtest(accepted, n, rate + 0.05).pvalue < REJECT
    assert scipy_stats.binomtest(accepted, n, rate - 0.05).pvalue < REJECT


def test_token_emitted_after_rejection_is_drawn_from_the_residual() -> None:
    """x = 3 is rejected with probability 0.75; of 6000 decisions about 4500 reject. The emitted
    tokens must fit norm(max(p - q, 0)) = [2/3, 0, 1/3, 0] (chi-square, ALPHA) and must reject
    the verifier's full row p (the fuzzy rule's emission, TV 0.27 away) at 1e-6."""
    n = 6000
    p = torch.stack([P0, P1])
    rng = Rng(7)
    emitted = []
    for _ in range(n):
        verdict = ExactPolicy().decide(one_token_block(3), p, rng)
        if verdict.n_accepted == 0:
            emitted.append(verdict.token)
    assert 4200 < len(emitted) < 4800
    expected = np.array([2 / 3, 0.0, 1 / 3, 0.0])
    np.testing.assert_allclose(residual(P0, Q).numpy(), expected, atol=1e-6)
    observed = counts(emitted, V)
    assert observed[1] == observed[3] == 0  # tokens with p <= q are never emitted as corrections
    assert chisquare_pvalue(observed, expected) > ALPHA
    assert chisquare_pvalue(observed, P0.numpy()) < REJECT


def _sample_output(policy: object, n: int, seed: int) -> list[int]:
    """First output token of ``n`` decisions on x ~ Q: the accepted x or the emitted token."""
    gen = torch.Generator().manual_seed(seed)
    rng = Rng(seed)
    p = torch.stack([P0, P1])
    out = []
    for x in torch.multinomial(Q, n, replacement=True, generator=gen).tolist():
        verdict = policy.decide(one_token_block(x), p, rng)  # type: ignore[attr-defined]
        out.append(x if verdict.n_accepted else verdict.token)
    return out


class EmitFullRowOnRejection(ExactPolicy):
    """Negative control: on rejection emit y ~ p instead of the residual (lossy)."""

    def decide(self, block: Block, p: torch.Tensor, rng: Rng) -> Verdict:
        verdict = super().decide(block, p, rng)
        if verdict.n_accepted < len(block):
            j = verdict.n_accepted
            return Verdict(verdict.accepted, rng.categorical(p[j]), p[j])
        return verdict


def test_first_output_token_is_an_exact_sample_of_p() -> None:
    """x ~ q, then accept-or-correct: the first output token must be distributed as p (8000
    samples, chi-square at ALPHA). The same test rejects (p < 1e-6) the policy that emits y ~ p
    on rejection, whose output is TV 0.12 away from p."""
    n = 8000
    good = _sample_output(ExactPolicy(), n, seed=11)
    assert chisquare_pvalue(counts(good, V), P0.numpy()) > ALPHA
    bad = _sample_output(EmitFullRowOnRejection(), n, seed=11)
    assert chisquare_pvalue(counts(bad, V), P0.numpy()) < REJECT


def test_every_position_of_a_three_token_block_is_exact() -> None:
    """Block x_1..x_3 with x_j ~ q_j (rows differ per position), verifier rows p_1..p_4. Output
    position k exists when the first k-1 tokens were accepted and must then be distributed as
    p_k -- position 4 is the bonus token. 6000 decisions; chi-square per position at ALPHA."""
    q = torch.tensor([[0.10, 0.30, 0.20, 0.40], [0.40, 0.20, 0.20, 0.20], [0.25, 0.25, 0.25, 0.25]])
    p = torch.tensor(
        [[0.30, 0.20, 0.30, 0.20], [0.20, 0.40, 0.10, 0.30], [0.10, 0.20, 0.40, 0.30], [0.60, 0.10, 0.10, 0.20]]
    )
    n = 6000
    gen = torch.Generator().manual_seed(5)
    rng = Rng(5)
    by_position: list[list[int]] = [[], [], [], []]
    for _ in range(n):
        x = torch.multinomial(q, 1, generator=gen).squeeze(-1)
        verdict = ExactPolicy().decide(Block(x, q), p, rng)
        j = verdict.n_accepted
        assert verdict.accepted == tuple(range(j))
        out = x[:j].tolist() + [verdict.token]
        for k, token in enumerate(out):
            by_position[k].append(token)
    for k in range(4):
        assert len(by_position[k]) > 800, f"position {k + 1} reached too rarely to test"
        assert chisquare_pvalue(counts(by_position[k], V), p[k].numpy()) > ALPHA, f"position {k + 1}"
    # power: position 2 is not distributed as its proposal row q_2 (TV 0.3)
    assert chisquare_pvalue(counts(by_position[1], V), q[1].numpy()) < REJECT


def test_bonus_token_when_all_accepted_comes_from_the_last_row() -> None:
    """x = 0 has p(0) = 0.4 >= q(0) = 0.1, so it is always accepted; the 4000 bonus tokens must fit
    p[1] (chi-square at ALPHA) and reject p[0] (TV 0.4) at 1e-6."""
    n = 4000
    p = torch.stack([P0, P1])
    rng = Rng(3)
    bonus = []
    for _ in range(n):
        verdict = ExactPolicy().decide(one_token_block(0), p, rng)
        assert verdict.accepted == (0,)
        assert torch.equal(verdict.row, P1)
        bonus.append(verdict.token)
    assert chisquare_pvalue(counts(bonus, V), P1.numpy()) > ALPHA
    assert chisquare_pvalue(counts(bonus, V), P0.numpy()) < REJECT


def test_verdict_row_is_the_full_verifier_row_not_the_residual() -> None:
    """docs/algorithms.md, trap 1: the row travelling up with a correction is p_j itself."""
    p = torch.stack([P0, P1])
    rng = Rng(0)
    seen = {"rejected": 0, "accepted": 0}
    for _ in range(200):
        verdict = ExactPolicy().decide(one_token_block(3), p, rng)
        if verdict.n_accepted == 0:
            seen["rejected"] += 1
            assert torch.equal(verdict.row, P0)
            assert not torch.allclose(verdict.row, residual(P0, Q))
        else:
            seen["accepted"] += 1
            assert torch.equal(verdict.row, P1)
    assert seen["rejected"] and seen["accepted"]


def test_decide_does_not_modify_its_inputs() -> None:
    q = Q.unsqueeze(0).clone()
    p = torch.stack([P0, P1])
    block = Block(torch.tensor([3]), q)
    before = (block.tokens.clone(), q.clone(), p.clone())
    rng = Rng(1)
    for _ in range(50):
        ExactPolicy().decide(block, p, rng)
    assert torch.equal(block.tokens, before[0]) and torch.equal(q, before[1]) and torch.equal(p, before[2])


def one_hot(i: int, vocab: int = V) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), vocab).float()


@pytest.mark.parametrize("seed", range(5))
def test_greedy_rows_accept_iff_equal_and_emit_the_verifier_argmax(seed: int) -> None:
    """One-hot rows (temperature 0): a token is accepted iff it equals the verifier's argmax; at
    the first mismatch the verifier's argmax is emitted; all equal -> bonus = argmax of p[n]."""
    rng = Rng(seed)
    verifier = [2, 0, 3, 1]  # argmax of p_1..p_4
    p = torch.stack([one_hot(a) for a in verifier])
    for proposal, n_ok in (([2, 0, 3], 3), ([2, 0, 1], 2), ([2, 1, 3], 1), ([0, 0, 3], 0)):
        block = Block(torch.tensor(proposal), torch.stack([one_hot(x) for x in proposal]))
        verdict = ExactPolicy().decide(block, p, rng)
        assert verdict.accepted == tuple(range(n_ok))
        assert verdict.token == verifier[n_ok]
        assert torch.equal(verdict.row, p[n_ok])


def test_residual_edge_cases() -> None:
    # p == q: nothing to correct, falls back to p (still a distribution)
    assert torch.equal(residual(P0, P0.clone()), P0)
    # q == 0: the residual is p itself
    torch.testing.assert_close(residual(P0, torch.zeros(V)), P0)
    # disjoint supports: the residual is p
    torch.testing.assert_close(residual(torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.5, 0.5])),
                               torch.tensor([0.5, 0.5, 0.0, 0.0]))
    # one-hot rows that differ: the residual is p's one-hot
    torch.testing.assert_close(residual(one_hot(1), one_hot(2)), one_hot(1))
    # batched rows, some equal and some not; every output row is a distribution
    p = torch.stack([P0, P1, P0])
    q = torch.stack([P0, Q, Q])
    r = residual(p, q)
    assert r.shape == (3, V)
    torch.testing.assert_close(r[0], P0)
    torch.testing.assert_close(r[1], torch.tensor([0.0, 0.0, 0.1, 0.0]) / 0.1)
    torch.testing.assert_close(r[2], torch.tensor([2 / 3, 0.0, 1 / 3, 0.0]))
    assert (r >= 0).all()
    torch.testing.assert_close(r.sum(-1), torch.ones(3))
    # inputs are not modified
    assert torch.equal(q[1], Q)


def test_empty_block_gives_only_a_bonus_token_from_the_first_row() -> None:
    """4000 decisions on an empty block: nothing accepted, the token ~ p[0] (chi-square, ALPHA)
    and the row is p[0]; the same test rejects P1 (TV 0.4) at 1e-6."""
    rng = Rng(2)
    p = P0.unsqueeze(0)
    tokens = []
    for _ in range(4000):
        verdict = ExactPolicy().decide(Block.empty(V), p, rng)
        assert verdict.accepted == ()
        assert torch.equal(verdict.row, P0)
        tokens.append(verdict.token)
    assert chisquare_pvalue(counts(tokens, V), P0.numpy()) > ALPHA
    assert chisquare_pvalue(counts(tokens, V), P1.numpy()) < REJECT


def test_chain_written_as_a_tree_is_verified_like_the_chain() -> None:
    """A tree whose parents are [-1, 0, 1] is a chain; greedy verdicts must coincide with the
    chain's, and in sampling mode the first output token must still fit p_1 (4000 decisions,
    chi-square at ALPHA; p_1 is TV 0.45 from q_1, so a wrong rule would show)."""
    chain_parents = torch.tensor([-1, 0, 1])
    verifier = [2, 0, 3, 1]
    p = torch.stack([one_hot(a) for a in verifier])
    for proposal in ([2, 0, 3], [2, 0, 1], [2, 1, 3], [0, 0, 3]):
        rows = torch.stack([one_hot(x) for x in proposal])
        as_chain = ExactPolicy().decide(Block(torch.tensor(proposal), rows), p, Rng(0))
        as_tree = ExactPolicy().decide(Block(torch.tensor(proposal), rows, parents=chain_parents), p, Rng(0))
        assert (as_tree.accepted, as_tree.token) == (as_chain.accepted, as_chain.token)
        assert torch.equal(as_tree.row, as_chain.row)
    q = Q.expand(3, V).clone()
    p = torch.stack([P0, P1, P0, P1])
    gen = torch.Generator().manual_seed(9)
    rng = Rng(9)
    first = []
    for _ in range(4000):
        x = torch.multinomial(q, 1, generator=gen).squeeze(-1)
        verdict = ExactPolicy().decide(Block(x, q, parents=chain_parents), p, rng)
        first.append(int(x[0]) if verdict.n_accepted else verdict.token)
    assert chisquare_pvalue(counts(first, V), P0.numpy()) > ALPHA
    assert chisquare_pvalue(counts(first, V), Q.numpy()) < REJECT
