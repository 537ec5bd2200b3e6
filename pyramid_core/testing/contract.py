"""``check_policy_contract(policy)``: call it on a new acceptance policy before trusting it.

Calls ``policy.decide(block, p, rng)`` on random explicit rows -- chains of several lengths
(empty blocks included) built from dense, peaked, sparse (top-k-like), one-hot (greedy),
one-hot-draft (``ngram``-like) and ``q == p`` rows -- and checks every ``Verdict`` against
the ``AcceptancePolicy`` contract (``pyramid_core/protocols.py``, ``types.Verdict``):

``verdict``      ``decide`` returns a ``Verdict`` and does not raise;
``prefix``       ``accepted`` is ``(0, 1, ..., j-1)`` for some ``0 <= j <= n``;
``token-range``  the emitted token is an integer in ``[0, vocab)``;
``token-mass``   the emitted token has positive mass under the verifier's row ``p[j]``;
``row``          ``row`` is the verifier's full row ``p[j]`` at the emitted position, never
                 a residual ([trap 1](../../algorithms.md#the-two-traps));
``determinism``  a second call with a fresh ``Rng`` of the same seed gives the same verdict
                 (all randomness comes from ``rng``);
``pure``         ``decide`` leaves ``block`` and ``p`` unchanged.

With ``trees=True`` it also checks token trees (``tree-path``: ``accepted`` is a
root-to-node path, and ``row`` is ``p[accepted[-1] + 1]``, or ``p[0]`` for an empty path).

It raises ``AssertionError`` whose message names the policy, the violated rule and the case, so it
works as a one-line pytest test; ``contract_cases`` rebuilds the case.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import attrs
import torch

from pyramid_core.build import make_policy
from pyramid_core.errors import PolicyOutputError
from pyramid_core.protocols import AcceptancePolicy
from pyramid_core.rng import Rng
from pyramid_core.testing.contract_cases import ContractCase, contract_cases
from pyramid_core.types import Verdict
from pyramid_core.validate import check_verdict, policy_label

__all__ = ["ContractReport", "check_policy_contract", "describe_policy", "resolve_policy"]


describe_policy = policy_label  # the spec string, the policy's ``name`` attribute, or its repr


def resolve_policy(policy: AcceptancePolicy | str) -> AcceptancePolicy:
    """``policy`` itself, or the policy a spec string names; refuses an object without ``decide``."""
    if isinstance(policy, str):
        return make_policy(policy)
    if not callable(getattr(policy, "decide", None)):
        raise AssertionError(f"{describe_policy(policy)} is not an acceptance policy: it has no decide(block, p, rng) method")
    return policy


@attrs.frozen
class ContractReport:
    """What ``check_policy_contract`` saw (it raises on the first violation)."""

    policy: str
    decisions: int
    vocab: int
    # mean accepted length per (kind, block length): how the rule behaves, for a quick look
    mean_accepted: dict[tuple[str, int], float]

    def summary(self) -> str:
        lines = [f"{self.policy}: {self.decisions} decisions, every contract rule holds",
                 "mean accepted length by case kind and block length:"]
        lengths = sorted({n for _, n in self.mean_accepted})
        kinds = list(dict.fromkeys(k for k, _ in self.mean_accepted))
        lines.append(f"  {'kind':<26}" + "".join(f"{'n=' + str(n):>7}" for n in lengths))
        for kind in kinds:
            cells = [self.mean_accepted.get((kind, n)) for n in lengths]
            lines.append(f"  {kind:<26}" + "".join(f"{c:>7.2f}" if c is not None else f"{'-':>7}" for c in cells))
        return "\n".join(lines)


def _fail(name: str, rule: str, case: ContractCase, detail: str, rebuild: str) -> AssertionError:
    return AssertionError(
        f"policy {name} violates the acceptance-policy contract, rule [{rule}]: {detail}\n"
        f"  on {case.describe()}, decided with Rng({case.seed}); rebuild it with "
        f"contract_cases({rebuild})[{case.index}]"
    )


def _expected_row_index(case: ContractCase, accepted: tuple[int, ...]) -> int:
    """Index into p of the verifier's row at the emitted token's position."""
    if case.block.parents is None:
        return len(accepted)
    return accepted[-1] + 1 if accepted else 0


def _check_one(name: str, policy: AcceptancePolicy, case: ContractCase, rebuild: str) -> int:
    block, p = case.block, case.p
    vocab = int(p.shape[-1])
    before = (block.tokens.clone(), block.rows.clone(), p.clone())
    try:
        verdict = policy.decide(block, p, Rng(case.seed))
    except Exception as exc:
        raise _fail(name, "verdict", case, f"decide() raised {exc!r}", rebuild) from exc
    if not isinstance(verdict, Verdict):
        raise _fail(name, "verdict", case, f"decide() returned {type(verdict).__name__}, not a pyramid_core.Verdict", rebuild)
    if not (torch.equal(block.tokens, before[0]) and torch.equal(block.rows, before[1]) and torch.equal(p, before[2])):
        raise _fail(name, "pure", case, "decide() modified its inputs (block.tokens, block.rows or p) in place", rebuild)
    try:  # the rules the pipeline checks every round, by the same function
        accepted, token = check_verdict(verdict, block, vocab, policy=name)
    except PolicyOutputError as exc:
        raise _fail(name, exc.rule, case, exc.detail, rebuild) from None
    j = _expected_row_index(case, accepted)
    expected = p[j]
    if not float(expected[token]) > 0:
        raise _fail(name, "token-mass", case,
                    f"emitted token {token} has probability 0 under the verifier's row p[{j}] at the emitted position "
                    f"(support: {expected.nonzero().flatten().tolist()}); the emitted token must be one the verifier can produce",
                    rebuild)
    row = verdict.row
    row64, expected64 = row.detach().to("cpu", torch.float64), expected.to(torch.float64)
    if not torch.allclose(row64, expected64, rtol=1e-5, atol=1e-6):
        where = f"the bonus row p[{j}]" if j == len(block) and block.parents is None else f"p[{j}]"
        diff = float((row64 - expected64).abs().max())
        raise _fail(name, "row", case,
                    f"row is not the verifier's full row {where} at the emitted position (max |difference| {diff:.3g}); "
                    "it must be p itself, not a residual or the proposer's row (docs/algorithms.md#the-two-traps, trap 1)", rebuild)
    try:
        again = policy.decide(block, p, Rng(case.seed))
        same = (tuple(again.accepted) == tuple(verdict.accepted) and operator.index(again.token) == token
                and torch.equal(again.row.detach().cpu(), row.detach().cpu()))
        seen = f"accepted {tuple(again.accepted)}, token {again.token}"
    except Exception as exc:
        same, seen = False, f"an exception {exc!r}"
    if not same:
        raise _fail(name, "determinism", case,
                    f"two calls with Rng({case.seed}) gave different verdicts (accepted {accepted}, token {token} vs "
                    f"{seen}); draw every random number from the rng argument, not from torch's global generator",
                    rebuild)
    return len(accepted)


def check_policy_contract(
    policy: AcceptancePolicy | str,
    *,
    vocab: int = 6,
    trials: int = 240,
    lengths: Sequence[int] = (0, 1, 2, 3, 5, 8),
    seed: int = 0,
    trees: bool = False,
    name: str | None = None,
) -> ContractReport:
    """Check ``policy`` (an object with ``decide`` or a spec such as ``"fuzzy:tau=0.3"``) on
    ``trials`` random explicit cases; raise ``AssertionError`` naming the policy, the violated
    rule (module docstring) and the case at the first violation. ``trees=True`` also feeds token
    trees (only for policies that verify trees; ``fuzzy`` and ``assisted`` refuse them)."""
    resolved = resolve_policy(policy)
    label = name or describe_policy(policy)
    rebuild = f"vocab={vocab}, trials={trials}, lengths={tuple(lengths)}, seed={seed}, trees={trees}"
    totals: dict[tuple[str, int], list[int]] = {}
    cases = contract_cases(vocab=vocab, trials=trials, lengths=lengths, seed=seed, trees=trees)
    for case in cases:
        n_accepted = _check_one(label, resolved, case, rebuild)
        acc = totals.setdefault((case.kind, len(case.block)), [0, 0])
        acc[0] += n_accepted
        acc[1] += 1
    means = {key: a / c for key, (a, c) in sorted(totals.items(), key=lambda kv: kv[0][1])}
    return ContractReport(label, len(cases), vocab, means)
