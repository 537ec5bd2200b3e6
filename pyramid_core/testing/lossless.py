"""``check_policy_lossless(policy)``: is an acceptance policy lossless?

Runs the real pipeline over ``TableModel`` stages with the policy at every boundary
(``pyramid_core.testing.exactness.run_check``) and compares the generated tokens with the target's table
by a chi-square test. The tables depend on the context (each row rotated by the token before it),
so a rule that draws the bonus or the correction from the row of the wrong position fails too. Passing means "no detectable distortion at this sample size" -- a lossy
rule such as ``fuzzy`` is reported with its p-value and total variation.

It raises ``AssertionError`` naming the policy and the failing checks, so it works as a one-line
pytest test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from pyramid_core.protocols import AcceptancePolicy
from pyramid_core.testing.contract import describe_policy, resolve_policy
from pyramid_core.types import SamplingConfig

if TYPE_CHECKING:
    from pyramid_core.testing.exactness import CheckResult

__all__ = ["DEFAULT_TABLES", "LosslessCheck", "LosslessReport", "check_policy_lossless"]

# Default tables for ``check_policy_lossless``: one case per tuple, one distribution per stage,
# smallest first. A two-stage pair far apart (TV 0.45), and a three-stage chain with zeros, where
# a wrong emitted row (trap 1) or a wrong residual at the lower boundary reaches the output. With
# ``markov=True`` each row is rotated by the token before it (``exactness.rolled``).
DEFAULT_TABLES: tuple[tuple[tuple[float, ...], ...], ...] = (
    ((0.10, 0.30, 0.20, 0.40), (0.40, 0.15, 0.35, 0.10)),
    ((0.60, 0.20, 0.20, 0.00), (0.10, 0.40, 0.10, 0.40), (0.30, 0.00, 0.50, 0.20)),
)


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
    markov: bool = True,
) -> LosslessReport:
    """Is ``policy`` lossless? For every case of ``tables`` (one distribution per stage, smallest
    first) and every block length L of ``lengths`` (used at every boundary), run the real pipeline
    ``samples`` times with the policy at every boundary, count the first ``new_tokens`` generated
    tokens of each run (default ``max(lengths) + 1``, so bonus tokens and later rounds count) and
    test them against the target's (transformed) table with a chi-square test.

    ``markov=True`` (default): each stage's row after token t is its table rotated right by t
    places (``exactness.rolled``), so consecutive positions have different rows; under
    losslessness the counted tokens are a Markov chain under the target's rotated rows, tested by
    their transition counts (``exactness.transition_p_value``; ``max_tv`` is then the total
    variation over transitions). ``markov=False``: the same row after any context, so every
    counted token is an independent draw from the target -- blind to a rule that uses the row of
    the wrong position. Each of the m checks fails at p < alpha / m (Bonferroni),
    so a lossless policy fails with probability at most ``alpha``; runs are seeded, hence
    reproducible. Raises ``AssertionError`` naming the policy and the failing checks unless
    ``raise_on_failure=False``; the returned report has ``lossless``, ``max_tv`` and
    ``summary()``. The chi-square test needs expected counts of about 5 or more: keep
    ``samples * new_tokens * p`` >= 5 for every non-zero target probability p. Cost: about 1 ms
    per run on a CPU (``samples * len(tables) * len(lengths)`` runs)."""
    from pyramid_core.testing.exactness import run_check  # lazy: scipy (seconds to import)

    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not tables or any(len(case) < 2 for case in tables):
        raise ValueError("tables: give at least one case of at least two distributions (draft ..., target)")
    if not lengths or any(n < 1 for n in lengths):
        raise ValueError(f"lengths must be block lengths >= 1, got {tuple(lengths)}")
    resolved = resolve_policy(policy)
    label = name or describe_policy(policy)
    count = new_tokens if new_tokens is not None else max(lengths) + 1
    m = len(tables) * len(lengths)
    checks: list[LosslessCheck] = []
    for c, case in enumerate(tables):
        dists = tuple(tuple(float(v) for v in d) for d in case)
        for i, length in enumerate(lengths):
            ells = (int(length),) * (len(dists) - 1)
            result = run_check(dists, [resolved] * len(ells), ells, samples=samples,
                               seed=seed + 101 * c + i, sampling=sampling, new_tokens=count, markov=markov)
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
