"""The conformance helpers of ``pyramid_core.testing``: built-in policies pass, broken ones fail
with a message that names the policy and the violated rule.

Contract checks are deterministic (seeded random cases). Losslessness checks run the real
pipeline over explicit tables with ``samples`` runs x ``max(lengths) + 1`` tokens per check and a
family-wise chi-square level alpha = 1e-3 (seeded, so each outcome below is fixed); the broken
policies' distortions (TV >= 0.05) are rejected with p < 1e-8 at these sample sizes.
"""

from __future__ import annotations

import re

import attrs
import pytest
import torch
from torch import Tensor

from pyramid_core import Block, ConfigError, Rng, SamplingConfig, Verdict
from pyramid_core.testing import (
    DEFAULT_TABLES,
    TableModel,
    check_policy_contract,
    check_policy_lossless,
    contract_cases,
)
from pyramid_core.testing.contract_cases import CHAIN_KINDS
from pyramid_plugins.exact import ExactPolicy, residual
from pyramid_plugins.fallback import Fallback
from pyramid_plugins.fuzzy import FuzzyPolicy

# ------------------------------------------------------------------ deliberately broken policies


@attrs.frozen
class ResidualRow:
    """Exact rejection sampling, but the row sent up with a correction is the residual it was
    drawn from instead of the verifier's full row (docs/algorithms.md, trap 1)."""

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        v = ExactPolicy().decide(block, p, rng)
        j = v.n_accepted
        if j < len(block):
            return Verdict(v.accepted, v.token, residual(p[j], block.rows[j]))
        return v


@attrs.frozen
class SkipRejected:
    """Accepts every token with p(x) >= q(x), skipping the others: not a prefix."""

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        n = len(block)
        keep = tuple(i for i in range(n) if float(p[i, block.tokens[i]]) >= float(block.rows[i, block.tokens[i]]))
        return Verdict(keep, rng.categorical(p[len(keep)]), p[len(keep)])


@attrs.frozen
class EmitDraftToken:
    """On rejection emits the draft token again: it may have no mass under the verifier."""

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        v = ExactPolicy().decide(block, p, rng)
        j = v.n_accepted
        return Verdict(v.accepted, int(block.tokens[j]), p[j]) if j < len(block) else v


@attrs.frozen
class GlobalRandom:
    """Draws its uniforms from torch's global generator instead of ``rng``."""

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        n = len(block)
        x = block.tokens
        ok = torch.rand(n) * block.rows[torch.arange(n), x] < p[torch.arange(n), x]
        j = int((~ok).nonzero()[0, 0]) if bool((~ok).any()) else n
        return Verdict(tuple(range(j)), int(p[j].argmax()), p[j])


@attrs.frozen
class ZeroesRejectedInPlace:
    """Removes the rejected token from q in place (a missing ``clone()``)."""

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        v = ExactPolicy().decide(block, p, rng)
        j = v.n_accepted
        if j < len(block):
            block.rows[j, block.tokens[j]] = 0.0
        return v


@attrs.frozen
class CorrectFromP:
    """Contract-abiding but lossy: corrects from the verifier's row p instead of the residual."""

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        v = ExactPolicy().decide(block, p, rng)
        j = v.n_accepted
        return Verdict(v.accepted, rng.categorical(p[j]), p[j])


@attrs.frozen
class BonusFromPreviousRow:
    """Exact, but the bonus token is drawn from the row of the last accepted position, p[n-1],
    instead of p[n]: invisible to tables that ignore the context."""

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        v = ExactPolicy().decide(block, p, rng)
        n = len(block)
        if v.n_accepted == n and n > 0:
            return Verdict(v.accepted, rng.categorical(p[n - 1]), p[n])
        return v


@attrs.frozen
class CorrectFromPreviousResidual:
    """Exact, but a correction at position j >= 1 is drawn from the residual of position j-1."""

    def decide(self, block: Block, p: Tensor, rng: Rng) -> Verdict:
        v = ExactPolicy().decide(block, p, rng)
        j = v.n_accepted
        if 0 < j < len(block):
            return Verdict(v.accepted, rng.categorical(residual(p[j - 1], block.rows[j - 1])), p[j])
        return v


# ------------------------------------------------------------------ the cases themselves


def test_cases_cover_every_kind_and_length_and_are_reproducible() -> None:
    lengths = (0, 1, 2, 3, 5, 8)
    cases = contract_cases(vocab=6, trials=240, lengths=lengths, seed=0)
    assert {(c.kind, len(c.block)) for c in cases} == {(k, n) for k in CHAIN_KINDS for n in lengths}
    for c in cases:
        n = len(c.block)
        assert c.p.shape == (n + 1, 6) and c.block.rows.shape == (n, 6)
        # every proposed token was drawn from its row: positive mass under q
        assert all(float(c.block.rows[i, t]) > 0 for i, t in enumerate(c.block.tokens.tolist()))
        assert torch.allclose(c.p.sum(-1), torch.ones(n + 1), atol=1e-5)
    again = contract_cases(vocab=6, trials=240, lengths=lengths, seed=0)
    assert all(torch.equal(a.p, b.p) and torch.equal(a.block.tokens, b.block.tokens) for a, b in zip(cases, again))
    one_hot = [c for c in cases if c.kind == "one-hot" and len(c.block) > 0]
    assert all(bool(((c.p == 0) | (c.p == 1)).all()) for c in one_hot)  # greedy rows
    trees = [c for c in contract_cases(trials=60, trees=True) if c.block.is_tree]
    assert len(trees) == 30 and {c.kind for c in trees} == {"tree", "tree-without-replacement"}


# ------------------------------------------------------------------ built-ins pass


@pytest.mark.parametrize(
    "policy",
    [ExactPolicy(), Fallback(), Fallback(ExactPolicy()), FuzzyPolicy(), FuzzyPolicy(div="kl_pq", tau=0.05),
     "fuzzy:div=tv,tau=0.2", "assisted"],
    ids=repr,
)
def test_builtin_policies_keep_the_contract(policy: object) -> None:
    report = check_policy_contract(policy, vocab=6, trials=240)  # type: ignore[arg-type]
    assert report.decisions == 240
    assert report.mean_accepted[("q-equals-p", 0)] == 0.0  # empty blocks were decided
    assert "every contract rule holds" in report.summary()


def test_exact_keeps_the_contract_on_token_trees() -> None:
    report = check_policy_contract(ExactPolicy(), trials=120, trees=True)
    assert report.decisions == 180


def test_chain_only_policies_fail_the_tree_contract_clearly() -> None:
    with pytest.raises(AssertionError, match=r"FuzzyPolicy.*\[verdict\].*verifies chains, not token trees"):
        check_policy_contract(FuzzyPolicy(), trials=12, trees=True)


@pytest.mark.parametrize("policy", [ExactPolicy(), "assisted"], ids=repr)
def test_exact_and_assisted_are_lossless(policy: object) -> None:
    """2 default table cases x block lengths (1, 3), 600 runs x 4 tokens each."""
    report = check_policy_lossless(policy, samples=600)  # type: ignore[arg-type]
    assert report.lossless and len(report.checks) == 4
    assert report.max_tv < 0.05
    assert "no detectable distortion" in report.summary()


def test_exact_is_lossless_in_greedy_mode() -> None:
    report = check_policy_lossless(ExactPolicy(), samples=50, sampling=SamplingConfig.greedy())
    assert report.lossless and report.max_tv == 0.0


def test_fuzzy_keeps_the_contract_but_is_reported_lossy() -> None:
    """Default tables: JS(q, p) < tau = 0.4, so fuzzy returns the draft's distribution (TV 0.45
    on the first case); 300 runs x 4 tokens per check."""
    report = check_policy_lossless(FuzzyPolicy(), samples=300, raise_on_failure=False)
    assert not report.lossless and report.max_tv > 0.3
    assert "LOSSY" in report.summary()
    with pytest.raises(AssertionError, match=r"policy FuzzyPolicy\(div='js', tau=0\.4\) is not lossless"):
        check_policy_lossless(FuzzyPolicy(), samples=300)


def test_assisted_wrapping_exact_keeps_the_contract_but_is_lossy() -> None:
    """``Fallback(ExactPolicy())`` re-checks a token that exact rejected against the verifier's
    own sample instead of drawing from the residual, so a position emits
    z with probability min(p, q)(z) + TV(p, q) p(z), not p(z). On the first default case
    (2 stages, first token) that is [0.28, 0.2175, 0.3575, 0.145] against p = [0.4, 0.15, 0.35,
    0.1]: TV 0.12; 2,000 runs x 1 token (sampling error of the TV about 0.015)."""
    check_policy_contract(Fallback(ExactPolicy()))
    report = check_policy_lossless("assisted:inner=exact", tables=DEFAULT_TABLES[:1], lengths=(1,), samples=2000,
                                   new_tokens=1, raise_on_failure=False)
    assert not report.lossless
    assert report.max_tv == pytest.approx(0.12, abs=0.03)


# ------------------------------------------------------------------ broken policies fail clearly


@pytest.mark.parametrize(
    ("policy", "rule", "words"),
    [
        (ResidualRow(), "row", "not the verifier's full row"),
        (SkipRejected(), "prefix", "must be (0, 1, ..., j-1)"),
        (EmitDraftToken(), "token-mass", "has probability 0 under the verifier's row"),
        (GlobalRandom(), "determinism", "global generator"),
        (ZeroesRejectedInPlace(), "pure", "modified its inputs"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_broken_policies_fail_the_contract_naming_policy_and_rule(policy: object, rule: str, words: str) -> None:
    with pytest.raises(AssertionError) as info:
        check_policy_contract(policy)  # type: ignore[arg-type]
    message = str(info.value)
    assert f"policy {type(policy).__name__}()" in message
    assert f"rule [{rule}]" in message
    assert words in message
    # the message says how to rebuild the failing case, and that case really fails
    index = int(re.search(r"\)\[(\d+)\]", message).group(1))  # type: ignore[union-attr]
    case = contract_cases()[index]
    assert f"case {index} ({case.kind} chain, n={len(case.block)}" in message


def test_residual_row_is_also_caught_by_the_lossless_check() -> None:
    """Trap 1 only shows with 3 stages: the 2-stage checks pass, the 3-stage ones reject."""
    report = check_policy_lossless(ResidualRow(), samples=400, raise_on_failure=False)
    assert [c.passed for c in report.checks] == [True, True, False, False]
    with pytest.raises(AssertionError, match=r"ResidualRow\(\) is not lossless.*1 of 1 checks"):
        check_policy_lossless(ResidualRow(), tables=DEFAULT_TABLES[1:], lengths=(3,), samples=400)


def test_a_contract_abiding_lossy_rule_fails_the_lossless_check() -> None:
    check_policy_contract(CorrectFromP())
    with pytest.raises(AssertionError, match=r"CorrectFromP\(\) is not lossless") as info:
        check_policy_lossless(CorrectFromP(), tables=DEFAULT_TABLES[:1], samples=400)
    assert "worst case: empirical" in str(info.value)


def test_bad_arguments_are_reported() -> None:
    with pytest.raises(ValueError, match="alpha"):
        check_policy_lossless(ExactPolicy(), alpha=0.0)
    with pytest.raises(ValueError, match="lengths"):
        check_policy_lossless(ExactPolicy(), lengths=(0,))
    with pytest.raises(ValueError, match="vocab"):
        check_policy_contract(ExactPolicy(), vocab=1)
    with pytest.raises(AssertionError, match="has no decide"):
        check_policy_contract(object())  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", [BonusFromPreviousRow(), CorrectFromPreviousResidual()],
                         ids=lambda v: type(v).__name__)
def test_a_rule_using_the_wrong_positions_row_fails_the_lossless_check(policy: object) -> None:
    """Negative controls for the context-dependent tables: the first default case, block lengths
    (1, 3), 200 runs x 4 tokens per check (800 transitions), family-wise alpha 1e-3. With rows
    that depend on the token before them both rules are rejected (seeded: p < 1e-18, TV of the
    transitions >= 0.09); with the same row after any context (``markov=False``, the check as it
    was) every row is the same and both pass (p > 0.2)."""
    with pytest.raises(AssertionError, match=rf"{type(policy).__name__}\(\) is not lossless"):
        check_policy_lossless(policy, tables=DEFAULT_TABLES[:1], samples=200)  # type: ignore[arg-type]
    blind = check_policy_lossless(policy, tables=DEFAULT_TABLES[:1], samples=200, markov=False)  # type: ignore[arg-type]
    assert blind.lossless


def test_a_table_by_last_token_gives_each_position_its_row() -> None:
    table = TableModel([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    assert table.vocab_size == 3
    rows = table.score(torch.tensor([0, 2]), Block(torch.tensor([1, 1]), torch.full((2, 3), 1 / 3))).exp()
    assert torch.allclose(rows, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.5, 0.5]]))
    tree = Block(torch.tensor([0, 1, 2]), torch.full((3, 3), 1 / 3), torch.tensor([-1, -1, 0]))
    rows = table.score(torch.tensor([1]), tree).exp()  # after the context, then after each node's token
    assert torch.allclose(rows, torch.tensor([[0.0, 0.5, 0.5], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]))
    with pytest.raises(ConfigError, match=r"row 1 \(after token 1\): probabilities must sum to 1"):
        TableModel([[0.5, 0.5], [0.5, 0.4]])
