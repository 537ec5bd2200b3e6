"""The exactness checker behind ``pyramid check``: run the real pipeline on explicit tables and
compare the empirical distribution of the first generated token with the target's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import torch
from scipy import stats as scipy_stats

from pyramid_core.errors import ConfigError
from pyramid_core.pipeline import Pipeline
from pyramid_core.protocols import AcceptancePolicy
from pyramid_core.rng import Rng
from pyramid_core.testing.table import TableModel, validate_distribution
from pyramid_core.types import SamplingConfig

__all__ = ["CheckResult", "run_check", "chi_square_p_value", "parse_dist"]


def parse_dist(text: str, *, name: str) -> list[float]:
    """``"0.5,0.3,0.2"`` -> [0.5, 0.3, 0.2], validated (sums to 1, no negatives or NaN)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"{name}: {text!r} is not a comma-separated list of numbers ({exc})") from None
    validate_distribution(values, name=name)
    return values


def chi_square_p_value(counts: Sequence[int], expected_probs: Sequence[float]) -> float:
    """Pearson chi-square goodness of fit. Categories with zero expected probability are dropped
    if never observed; an observation in one makes the p-value 0 (impossible under the target)."""
    n = sum(counts)
    keep = [i for i, p in enumerate(expected_probs) if p > 0]
    if any(counts[i] > 0 for i, p in enumerate(expected_probs) if p <= 0):
        return 0.0
    if len(keep) < 2:
        return 1.0
    obs = [counts[i] for i in keep]
    exp = [expected_probs[i] * n for i in keep]
    scale = sum(obs) / sum(exp)  # guards against float rounding in the table's sum
    return float(scipy_stats.chisquare(obs, [e * scale for e in exp]).pvalue)


@attrs.frozen
class CheckResult:
    empirical: list[float]
    target: list[float]
    tv: float
    p_value: float
    acceptance: list[float]
    samples: int
    counts: list[int]

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def run_check(
    dists: Sequence[Sequence[float]],
    policies: Sequence[AcceptancePolicy],
    lengths: Sequence[int],
    *,
    samples: int = 20_000,
    seed: int = 0,
    sampling: SamplingConfig | None = None,
) -> CheckResult:
    """Sample the first generated token ``samples`` times through the real pipeline."""
    if len(dists) < 1:
        raise ConfigError("give one --dist per stage (at least the target)")
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    sizes = {len(d) for d in dists}
    if len(sizes) != 1:
        raise ConfigError(f"every --dist must have the same number of entries, got sizes {[len(d) for d in dists]}")
    sampling = sampling or SamplingConfig()
    stages = [TableModel(d, name=f"stage {i + 1}") for i, d in enumerate(dists)]
    pipe = Pipeline(stages, list(policies), list(lengths), sampling)
    vocab = stages[-1].vocab_size
    counts = [0] * vocab
    proposed = [0] * len(lengths)
    accepted = [0] * len(lengths)
    prompt = torch.zeros(1, dtype=torch.long)
    rng = Rng(seed)  # one stream for the whole check: independent samples, reproducible
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead
    try:
        for _ in range(samples):
            proposer, metrics = pipe.build()
            token = int(proposer.propose(prompt, 1, rng).tokens[0])
            counts[token] += 1
            for k, b in enumerate(metrics.boundaries):
                proposed[k] += b.proposed
                accepted[k] += b.accepted
    finally:
        torch.set_num_threads(threads)
    target = sampling.transform(torch.tensor(dists[-1], dtype=torch.float64).log().unsqueeze(0))[0].tolist()
    empirical = [c / samples for c in counts]
    tv = 0.5 * sum(abs(e - t) for e, t in zip(empirical, target))
    return CheckResult(
        empirical=empirical,
        target=target,
        tv=tv,
        p_value=chi_square_p_value(counts, target),
        acceptance=[a / p if p else float("nan") for a, p in zip(accepted, proposed)],
        samples=samples,
        counts=counts,
    )
