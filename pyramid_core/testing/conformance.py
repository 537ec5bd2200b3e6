"""Conformance checks for acceptance policies: call them on a new rule before trusting it.
(One job -- the checks a policy author runs -- in one file, hence its length.)

Two checks, neither needs a model:

``check_policy_contract(policy)``
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

``check_policy_lossless(policy)``
    Runs the real pipeline over ``TableModel`` stages with the policy at every boundary
    (``pyramid_core.testing.exactness.run_check``) and compares the generated tokens with the target's table
    by a chi-square test. Passing means "no detectable distortion at this sample size" -- a lossy
    rule such as ``fuzzy`` is reported with its p-value and total variation.

Both raise ``AssertionError`` whose message names the policy and the violated rule, so they work
as one-line pytest tests. The random cases are reproducible: ``contract_cases`` rebuilds them.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import torch
from torch import Tensor

from pyramid_core.protocols import AcceptancePolicy
from pyramid_core.rng import Rng
from pyramid_core.types import Block, SamplingConfig, Verdict

if TYPE_CHECKING:
    from pyramid_core.testing.exactness import CheckResult

__all__ = [
    "CHAIN_KINDS",
    "DEFAULT_TABLES",
    "ContractCase",
    "ContractReport",
    "LosslessCheck",
    "LosslessReport",
    "check_policy_contract",
    "check_policy_lossless",
    "contract_cases",
    "describe_policy",
]

# the shapes of random rows a contract check cycles through (see ``_chain_rows``)
CHAIN_KINDS: tuple[str, ...] = ("dense", "peaked", "sparse", "one-hot", "one-hot-draft", "q-equals-p")

# Default tables for ``check_policy_lossless``: one case per tuple, one distribution per stage,
# smallest first. A two-stage pair far apart (TV 0.45), and a three-stage chain with zeros, where
# a wrong emitted row (trap 1) or a wrong residual at the lower boundary reaches the output.
DEFAULT_TABLES: tuple[tuple[tuple[float, ...], ...], ...] = (
    ((0.10, 0.30, 0.20, 0.40), (0.40, 0.15, 0.35, 0.10)),
    ((0.60, 0.20, 0.20, 0.00), (0.10, 0.40, 0.10, 0.40), (0.30, 0.00, 0.50, 0.20)),
)


def describe_policy(policy: AcceptancePolicy | str) -> str:
    """A name for messages: the spec string, the policy's ``name`` attribute, or its repr."""
    if isinstance(policy, str):
        return repr(policy)
    name = getattr(policy, "name", None)
    if isinstance(name, str) and name:
        return name
    text = repr(policy)
    return type(policy).__qualname__ if text.startswith("<") else text  # not "<... at 0x...>"


def _resolve(policy: AcceptancePolicy | str) -> AcceptancePolicy:
    if isinstance(policy, str):
        from pyramid_core.build import make_policy

        return make_policy(policy)
    if not callable(getattr(policy, "decide", None)):
        raise AssertionError(f"{describe_policy(policy)} is not an acceptance policy: it has no decide(block, p, rng) method")
    return policy


# ------------------------------------------------------------------------------ random cases


@attrs.frozen(eq=False)
class ContractCase:
    """One random input of the contract check: ``policy.decide(block, p, Rng(seed))``.

    block: the proposer's n tokens and rows ``q: Float[Tensor, "n vocab"]`` (each token drawn
           from its row); p: the verifier's rows ``Float[Tensor, "n+1 vocab"]``."""

    index: int
    kind: str
    block: Block
    p: Tensor
    seed: int

    def describe(self) -> str:
        shape = "tree" if self.block.is_tree else "chain"
        return f"case {self.index} ({self.kind} {shape}, n={len(self.block)} tokens, vocab {self.p.shape[-1]})"


def _softmax_rows(gen: torch.Generator, n: int, vocab: int, scale: float) -> Tensor:
    return torch.softmax(scale * torch.randn(n, vocab, generator=gen, dtype=torch.float64), -1)


def _sparse_rows(gen: torch.Generator, n: int, vocab: int) -> Tensor:
    """Rows with a random support of 1..vocab tokens (what top-k / top-p leave)."""
    rows = _softmax_rows(gen, n, vocab, 1.0)
    for i in range(n):
        k = int(torch.randint(1, vocab + 1, (1,), generator=gen))
        drop = torch.randperm(vocab, generator=gen)[k:]
        rows[i, drop] = 0.0
    return rows / rows.sum(-1, keepdim=True)


def _one_hot_rows(tokens: Tensor, vocab: int) -> Tensor:
    return torch.nn.functional.one_hot(tokens, vocab).to(torch.float64)


def _random_tokens(gen: torch.Generator, n: int, vocab: int) -> Tensor:
    return torch.randint(0, vocab, (n,), generator=gen)


def _chain_rows(kind: str, gen: torch.Generator, n: int, vocab: int) -> tuple[Tensor, Tensor]:
    """(q: "n vocab", p: "n+1 vocab") in float64 for one kind of case."""
    if kind == "dense":
        return _softmax_rows(gen, n, vocab, 1.0), _softmax_rows(gen, n + 1, vocab, 1.0)
    if kind == "peaked":
        return _softmax_rows(gen, n, vocab, 4.0), _softmax_rows(gen, n + 1, vocab, 4.0)
    if kind == "sparse":
        return _sparse_rows(gen, n, vocab), _sparse_rows(gen, n + 1, vocab)
    if kind == "one-hot":  # greedy mode: the verifier's argmax agrees with the draft 60% of the time
        draft = _random_tokens(gen, n, vocab)
        other = _random_tokens(gen, n + 1, vocab)
        agree = torch.rand(n, generator=gen) < 0.6
        argmax = torch.cat([torch.where(agree, draft, other[:n]), other[n:]])
        return _one_hot_rows(draft, vocab), _one_hot_rows(argmax, vocab)
    if kind == "one-hot-draft":  # a deterministic proposer (ngram) under a sampling verifier
        return _one_hot_rows(_random_tokens(gen, n, vocab), vocab), _softmax_rows(gen, n + 1, vocab, 2.0)
    if kind == "q-equals-p":  # nothing to correct: the residual is empty
        p = _softmax_rows(gen, n + 1, vocab, 1.0)
        return p[:n].clone(), p
    raise ValueError(f"unknown case kind {kind!r}; valid: {', '.join(CHAIN_KINDS)}")


def _draw(gen: torch.Generator, rows: Tensor) -> Tensor:
    if rows.shape[0] == 0:
        return torch.empty(0, dtype=torch.long)
    return torch.multinomial(rows, 1, generator=gen).squeeze(-1)


def _tree_case(gen: torch.Generator, n: int, vocab: int, without: bool) -> tuple[Block, Tensor]:
    """A random flattened tree of n nodes (n >= 1): siblings share their parent's row q and are
    drawn from it in order (without replacement: never repeating a sibling's token)."""
    parent_rows: dict[int, Tensor] = {}
    kids: dict[int, list[int]] = {}
    parents: list[int] = []
    tokens: list[int] = []
    rows: list[Tensor] = []
    for i in range(n):
        choices = [a for a in [-1, *range(i)] if not without or len(kids.get(a, [])) < vocab]
        parent = choices[int(torch.randint(0, len(choices), (1,), generator=gen))]
        q = parent_rows.setdefault(parent, _softmax_rows(gen, 1, vocab, 2.0)[0])
        siblings = [tokens[s] for s in kids.get(parent, [])]
        left = q.clone()
        if without and siblings:
            left[siblings] = 0.0
        tokens.append(int(torch.multinomial(left, 1, generator=gen)))
        kids.setdefault(parent, []).append(i)
        parents.append(parent)
        rows.append(q)
    block = Block(
        torch.tensor(tokens, dtype=torch.long),
        torch.stack(rows).float(),
        torch.tensor(parents, dtype=torch.long),
        without_replacement=without,
    )
    return block, _softmax_rows(gen, n + 1, vocab, 2.0).float()


def contract_cases(
    *,
    vocab: int = 6,
    trials: int = 240,
    lengths: Sequence[int] = (0, 1, 2, 3, 5, 8),
    seed: int = 0,
    trees: bool = False,
) -> list[ContractCase]:
    """The random inputs ``check_policy_contract`` uses (same arguments, same cases).

    Case t < trials is a chain of kind ``CHAIN_KINDS[t % 6]`` and length
    ``lengths[(t // 6) % len(lengths)]``, so ``trials >= 6 * len(lengths)`` covers every
    combination. ``trees=True`` appends ``trials // 2`` token trees of ``max(1, length)`` nodes
    (kinds ``tree`` and ``tree-without-replacement``, alternating)."""
    if vocab < 2:
        raise ValueError(f"vocab must be >= 2, got {vocab}")
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not lengths or any(n < 0 for n in lengths):
        raise ValueError(f"lengths must be block lengths >= 0, got {tuple(lengths)}")
    gen = torch.Generator().manual_seed(seed)
    cases: list[ContractCase] = []
    for t in range(trials):
        n = int(lengths[(t // len(CHAIN_KINDS)) % len(lengths)])
        kind = CHAIN_KINDS[t % len(CHAIN_KINDS)]
        q, p = _chain_rows(kind, gen, n, vocab)
        cases.append(ContractCase(t, kind, Block(_draw(gen, q), q.float()), p.float(), seed * 1_000_003 + t))
    for t in range(trials, trials + (trials // 2 if trees else 0)):
        n = max(1, int(lengths[((t - trials) // 2) % len(lengths)]))
        without = bool(t % 2)
        block, p = _tree_case(gen, n, vocab, without)
        kind = "tree-without-replacement" if without else "tree"
        cases.append(ContractCase(t, kind, block, p, seed * 1_000_003 + t))
    return cases


# ------------------------------------------------------------------------------ the contract


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


def _check_accepted(name: str, case: ContractCase, verdict: Verdict, rebuild: str) -> tuple[int, ...]:
    n = len(case.block)
    try:
        accepted = tuple(operator.index(a) for a in verdict.accepted)
    except TypeError:
        raise _fail(name, "prefix", case, f"accepted={verdict.accepted!r} is not a sequence of integer indices", rebuild) from None
    tree = case.block.tree
    if tree is None:
        if accepted != tuple(range(len(accepted))) or len(accepted) > n:
            raise _fail(name, "prefix", case,
                        f"accepted={accepted} for a chain of {n} tokens; it must be (0, 1, ..., j-1) for some "
                        f"0 <= j <= {n} -- a policy accepts a prefix and emits one token after it", rebuild)
        return accepted
    parent_of = list(tree.parents)
    previous = -1
    for a in accepted:
        if not 0 <= a < n or parent_of[a] != previous:
            raise _fail(name, "tree-path", case,
                        f"accepted={accepted} is not a root-to-node path of the tree with parents {parent_of}: "
                        f"node {a} does not hang below {'the context' if previous < 0 else f'node {previous}'}", rebuild)
        previous = a
    return accepted


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
    accepted = _check_accepted(name, case, verdict, rebuild)
    try:
        token = operator.index(verdict.token)
    except TypeError:
        raise _fail(name, "token-range", case, f"token={verdict.token!r} is not an integer token id", rebuild) from None
    if not 0 <= token < vocab:
        raise _fail(name, "token-range", case, f"token={token} is outside the vocabulary [0, {vocab})", rebuild)
    j = _expected_row_index(case, accepted)
    expected = p[j]
    if not float(expected[token]) > 0:
        raise _fail(name, "token-mass", case,
                    f"emitted token {token} has probability 0 under the verifier's row p[{j}] at the emitted position "
                    f"(support: {expected.nonzero().flatten().tolist()}); the emitted token must be one the verifier can produce",
                    rebuild)
    row = verdict.row
    if not isinstance(row, Tensor) or tuple(row.shape) != (vocab,):
        shape = tuple(row.shape) if isinstance(row, Tensor) else type(row).__name__
        raise _fail(name, "row", case, f"row must be a Float[Tensor, 'vocab'] of size {vocab}, got {shape}", rebuild)
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
    resolved = _resolve(policy)
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


# ------------------------------------------------------------------------------ losslessness


@attrs.frozen
class LosslessCheck:
    """One chi-square test: the policy at every boundary of a chain over ``tables``."""

    case: int  # index into the ``tables`` argument
    tables: tuple[tuple[float, ...], ...]
    block_lengths: tuple[int, ...]
    result: CheckResult
    level: float  # the p-value below which this check fails (alpha / number of checks)

    @property
    def passed(self) -> bool:
        return self.result.p_value > self.level

    def describe(self) -> str:
        r = self.result
        return (f"case {self.case} ({len(self.tables)} stages), block lengths {list(self.block_lengths)}: TV {r.tv:.4f}, "
                f"chi-square p {r.p_value:.3g} ({'ok' if self.passed else f'< {self.level:.2g}'}), "
                f"acceptance {[round(a, 3) for a in r.acceptance]}, "
                f"{r.samples} runs x {r.new_tokens} tokens")


@attrs.frozen
class LosslessReport:
    """Every check ``check_policy_lossless`` ran; ``lossless`` is False when any rejected."""

    policy: str
    alpha: float
    checks: tuple[LosslessCheck, ...]

    @property
    def lossless(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def max_tv(self) -> float:
        return max(c.result.tv for c in self.checks)

    @property
    def min_p_value(self) -> float:
        return min(c.result.p_value for c in self.checks)

    @property
    def failures(self) -> tuple[LosslessCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def summary(self) -> str:
        verdict = ("no detectable distortion (lossless at this sample size)" if self.lossless
                   else f"LOSSY: {len(self.failures)} of {len(self.checks)} checks reject the target")
        lines = [f"{self.policy}: {verdict}; family-wise alpha {self.alpha:g}, max TV {self.max_tv:.4f}"]
        lines += [f"  {c.describe()}" for c in self.checks]
        return "\n".join(lines)


def check_policy_lossless(
    policy: AcceptancePolicy | str,
    *,
    tables: Sequence[Sequence[Sequence[float]]] = DEFAULT_TABLES,
    lengths: Sequence[int] = (1, 3),
    samples: int = 1000,
    alpha: float = 1e-3,
    seed: int = 0,
    new_tokens: int | None = None,
    sampling: SamplingConfig | None = None,
    name: str | None = None,
    raise_on_failure: bool = True,
) -> LosslessReport:
    """Is ``policy`` lossless? For every case of ``tables`` (one distribution per stage, smallest
    first) and every block length L of ``lengths`` (used at every boundary), run the real pipeline
    ``samples`` times with the policy at every boundary, count the first ``new_tokens`` generated
    tokens of each run (default ``max(lengths) + 1``, so bonus tokens and later rounds count) and
    test them against the target's (transformed) table with a chi-square test.

    The tables do not depend on the context, so under losslessness every counted token is an
    independent draw from the target. Each of the m checks fails at p < alpha / m (Bonferroni),
    so a lossless policy fails with probability at most ``alpha``; runs are seeded, hence
    reproducible. Raises ``AssertionError`` naming the policy and the failing checks unless
    ``raise_on_failure=False``; the returned report has ``lossless``, ``max_tv`` and
    ``summary()``. The chi-square test needs expected counts of about 5 or more: keep
    ``samples * new_tokens * p`` >= 5 for every non-zero target probability p. Cost: about 1 ms
    per run on a CPU (``samples * len(tables) * len(lengths)`` runs)."""
    from pyramid_core.testing.exactness import run_check

    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not tables or any(len(case) < 2 for case in tables):
        raise ValueError("tables: give at least one case of at least two distributions (draft ..., target)")
    if not lengths or any(n < 1 for n in lengths):
        raise ValueError(f"lengths must be block lengths >= 1, got {tuple(lengths)}")
    resolved = _resolve(policy)
    label = name or describe_policy(policy)
    count = new_tokens if new_tokens is not None else max(lengths) + 1
    m = len(tables) * len(lengths)
    checks: list[LosslessCheck] = []
    for c, case in enumerate(tables):
        dists = tuple(tuple(float(v) for v in d) for d in case)
        for i, length in enumerate(lengths):
            ells = (int(length),) * (len(dists) - 1)
            result = run_check(dists, [resolved] * len(ells), ells, samples=samples,
                               seed=seed + 101 * c + i, sampling=sampling, new_tokens=count)
            checks.append(LosslessCheck(c, dists, ells, result, alpha / m))
    report = LosslessReport(label, alpha, tuple(checks))
    if raise_on_failure and not report.lossless:
        worst = min(report.failures, key=lambda chk: chk.result.p_value)
        emp = ", ".join(f"{e:.3f}" for e in worst.result.empirical)
        tgt = ", ".join(f"{t:.3f}" for t in worst.result.target)
        raise AssertionError(
            f"policy {label} is not lossless: its output is not distributed as the target in "
            f"{len(report.failures)} of {m} checks (family-wise alpha {alpha:g}).\n"
            + "\n".join(f"  FAIL tables {list(map(list, chk.tables))}: {chk.describe()}" for chk in report.failures)
            + f"\n  worst case: empirical [{emp}] vs target [{tgt}]."
            "\n  If the rule is lossy by design (like fuzzy), call with raise_on_failure=False and report "
            "report.max_tv as its distortion; otherwise look for a wrong residual, a wrong emitted row "
            "(docs/algorithms.md#the-two-traps, trap 1) or a decision that depends on later tokens."
        )
    return report
