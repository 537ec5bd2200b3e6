"""The exactness checker behind ``pyramid check`` and ``check_policy_lossless``: run the real
pipeline on explicit tables and compare the empirical distribution of the generated tokens with
the target's.

``tree=K`` drafts a token tree at the bottom (K candidates per position: branching K at every
depth up to the first block length; ``replacement=False`` for Sequoia-style draws). With
``new_tokens > 1`` every run generates that many tokens and all of them are counted: the tables
do not depend on the context, so under exactness each is an independent draw from the target,
and the runs also measure tokens per target forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch
from scipy import stats as scipy_stats

from pyramid_core.build import PipelineSpec
from pyramid_core.errors import ConfigError
from pyramid_core.plugins import Registries
from pyramid_core.protocols import AcceptancePolicy
from pyramid_core.rng import Rng
from pyramid_core.testing.table import TableModel, validate_distribution
from pyramid_core.types import SamplingConfig

__all__ = ["CheckResult", "run_check", "chi_square_p_value", "transition_p_value", "rolled", "parse_dist",
           "MAX_TREE_NODES"]

MAX_TREE_NODES = 4096  # K candidates per position at every depth: K + K^2 + ... + K^length nodes


def parse_dist(text: str, *, name: str) -> list[float]:
    """``"0.5,0.3,0.2"`` -> [0.5, 0.3, 0.2], validated (sums to 1, no negatives or NaN)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"{name}: {text!r} is not a comma-separated list of numbers ({exc})") from None
    validate_distribution(values, name=name)
    return values


def rolled(dist: Sequence[float]) -> list[list[float]]:
    """The ``vocab x vocab`` table by last token whose row t is ``dist`` rotated right by t
    places (row 0 is ``dist``): every position's distribution depends on the token before it."""
    return [list(dist[-t:]) + list(dist[:-t]) if t else list(dist) for t in range(len(dist))]


def _pearson(obs: np.ndarray, p: np.ndarray, min_expected: float) -> tuple[float, int] | None:
    """(Pearson statistic, degrees of freedom) of counts ``obs`` against probabilities ``p``,
    small cells pooled (``chi_square_p_value``); ``None`` if a zero-probability cell was seen."""
    n = obs.sum()
    if obs[p <= 0].sum() > 0:
        return None
    keep = p > 0
    obs, expected = obs[keep], n * p[keep] / p[keep].sum()  # rescaling guards against rounding
    order = np.argsort(expected, kind="stable")
    obs, expected = obs[order], expected[order]
    small = int((expected < min_expected).sum())
    if small > 1:
        obs = np.concatenate([[obs[:small].sum()], obs[small:]])
        expected = np.concatenate([[expected[:small].sum()], expected[small:]])
    if len(expected) > 1 and expected[0] < min_expected:
        obs = np.concatenate([[obs[0] + obs[1]], obs[2:]])
        expected = np.concatenate([[expected[0] + expected[1]], expected[2:]])
    if len(expected) < 2:
        return 0.0, 0
    return float(((obs - expected) ** 2 / expected).sum()), len(expected) - 1


def transition_p_value(counts: np.ndarray, rows: np.ndarray, *, min_expected: float = 5.0) -> float:
    """Goodness of fit of a Markov chain's transition counts ``counts[a, b]`` (token b after
    token a) to its transition rows ``rows[a]``: the Pearson statistics of the rows, each
    given its count, summed, against chi-square with the summed degrees of freedom (Anderson and
    Goodman 1957). A transition of probability 0 gives p = 0; 1.0 when no row has two cells."""
    stat, df = 0.0, 0
    for a in range(counts.shape[0]):
        if counts[a].sum() == 0:
            continue
        part = _pearson(counts[a].astype(float), rows[a].astype(float), min_expected)
        if part is None:
            return 0.0
        stat, df = stat + part[0], df + part[1]
    return float(scipy_stats.chi2.sf(stat, df)) if df else 1.0


def chi_square_p_value(counts: Sequence[int], expected_probs: Sequence[float], *, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit of ``counts`` to ``expected_probs``.

    Zero-probability categories are not cells: one observation in one means the sample cannot
    come from the target (p = 0); otherwise they are dropped. Cells whose expected count is below
    ``min_expected`` are pooled (smallest first) so the chi-square approximation holds; a pooled
    cell that is still small joins the next smallest. Returns 1.0 when fewer than two cells remain.
    """
    obs = np.asarray(counts, dtype=float).ravel()
    p = np.asarray(expected_probs, dtype=float).ravel()
    if obs.shape != p.shape:
        raise ValueError(f"counts has {obs.size} categories, expected_probs {p.size}")
    if obs.sum() == 0:
        raise ValueError("no observations")
    part = _pearson(obs, p, min_expected)
    if part is None:
        return 0.0
    stat, df = part
    return float(scipy_stats.chi2.sf(stat, df)) if df else 1.0


@attrs.frozen
class CheckResult:
    empirical: list[float]
    target: list[float]
    tv: float
    p_value: float
    acceptance: list[float]  # accepted / proposed per boundary (the old name of accepted_per_proposed)
    samples: int
    counts: list[int]
    tokens_per_target_forward: float = float("nan")
    new_tokens: int = 1
    tree: int = 0
    replacement: bool = True
    mean_tree_nodes: float = float("nan")
    # generated tokens per forward of each verifying stage 2..N (the last: per target forward)
    tokens_per_forward: list[float] = attrs.field(factory=list)
    policies: list[str] = attrs.field(factory=list)  # what ran at each boundary
    block_lengths: list[int] = attrs.field(factory=list)
    # per boundary: accepted / tries, comparable to alpha and 1 - TV (types.BoundaryStats) ...
    acceptance_per_try: list[float] = attrs.field(factory=list)
    # ... and accepted / proposed, the share of proposed tokens kept (= ``acceptance``)
    accepted_per_proposed: list[float] = attrs.field(factory=list)

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def run_check(
    dists: Sequence[Sequence[float]],
    policies: Sequence[str | AcceptancePolicy] | None = None,
    lengths: Sequence[int] | None = None,
    *,
    preset: str | None = None,
    samples: int = 20_000,
    seed: int = 0,
    sampling: SamplingConfig | None = None,
    tree: int = 0,
    replacement: bool = True,
    new_tokens: int = 1,
    length_schedule: str = "fixed",
    confidence_stop: float = 0.0,
    regs: Registries | None = None,
    markov: bool = False,
    lookup: str | None = None,
    lookup_graft: bool = False,
) -> CheckResult:
    """Sample the first ``new_tokens`` generated tokens ``samples`` times through the real
    pipeline over ``TableModel`` stages. ``policies`` / ``lengths`` / ``preset`` as in
    ``PipelineSpec`` (``None``: the default policy at every boundary, block length 1); ``tree``,
    ``replacement``: see the module docstring (the registered ``tree`` wrapper, from ``regs``);
    ``lookup``: a model-free proposer asked first each round (``PipelineSpec.lookup``), grafted
    beside the first stage's block with ``lookup_graft``.

    ``markov=True``: every stage's row after token t is its table rotated by t (``rolled``), so
    rows differ from position to position; the generated tokens (after the prompt ``[0]``) are
    then a Markov chain under the target, tested by their transition counts
    (``transition_p_value``). ``empirical``, ``target`` and ``counts`` are then over the
    ``vocab * vocab`` transitions (a -> b at index ``a * vocab + b``; the target weighs row a by
    how often a was seen), and ``tv`` is the total variation between them."""
    if len(dists) < 1:
        raise ConfigError("give one --dist per stage (at least the target)")
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    if new_tokens < 1:
        raise ConfigError(f"--new-tokens must be >= 1, got {new_tokens}")
    if tree < 0:
        raise ConfigError(f"--tree must be >= 0 (candidates per position; 0 = a chain), got {tree}")
    if tree and len(dists) < 2:
        raise ConfigError("--tree needs at least two stages (a draft to propose the tree and a verifier)")
    sizes = {len(d) for d in dists}
    if len(sizes) != 1:
        raise ConfigError(f"every --dist must have the same number of entries, got sizes {[len(d) for d in dists]}")
    sampling = sampling or SamplingConfig()
    stages: list[Any] = [TableModel(rolled(d) if markov else d, name=f"stage {i + 1}") for i, d in enumerate(dists)]
    if lengths is None and preset is None:
        lengths = [1] * (len(dists) - 1)
    spec = PipelineSpec(stages, policies, lengths, preset, sampling=sampling, stop_ids=(),
                        length_schedule=length_schedule, confidence_stop=confidence_stop, lookup=lookup,
                        lookup_graft=lookup_graft)
    pipe = spec.resolve(regs)  # validates the lengths
    ells = list(pipe.block_lengths)
    if tree and sum(tree**d for d in range(1, ells[0] + 1)) > MAX_TREE_NODES:
        raise ConfigError(
            f"--tree {tree} with block length {ells[0]} at boundary 1 -> 2 makes trees of "
            f"{sum(tree**d for d in range(1, ells[0] + 1))} nodes (at most {MAX_TREE_NODES}); "
            "use a smaller --tree or a shorter first --length"
        )
    if tree:  # the registered tree wrapper around the bottom table
        branching = "-".join([str(tree)] * ells[0])
        pipe = attrs.evolve(spec, tree=f"tree:branching={branching},replacement={replacement}").resolve(regs)
    vocab = stages[-1].vocab_size
    counts = [0] * vocab
    moves = np.zeros((vocab, vocab), dtype=np.int64)  # markov: transitions a -> b
    proposed = [0] * len(ells)
    accepted = [0] * len(ells)
    tries = [0] * len(ells)
    forwards = [0] * len(ells)  # of stages 2..N
    tree_nodes = tree_rounds = 0
    prompt = torch.zeros(1, dtype=torch.long)
    rng = Rng(seed)  # one stream for the whole check: independent samples, reproducible
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead
    try:
        for _ in range(samples):
            proposer, metrics = pipe.build()
            previous = int(prompt[-1])
            for token in proposer.propose(prompt, new_tokens, rng).tokens.tolist():
                counts[token] += 1
                moves[previous, token] += 1
                previous = token
            for k, stage in enumerate(metrics.stages[1:]):
                forwards[k] += stage.forwards
            for k, b in enumerate(metrics.boundaries):
                proposed[k] += b.proposed
                accepted[k] += b.accepted
                tries[k] += b.tries
            tree_nodes += metrics.boundaries[0].tree_nodes if metrics.boundaries else 0
            tree_rounds += metrics.boundaries[0].tree_rounds if metrics.boundaries else 0
    finally:
        torch.set_num_threads(threads)
    drawn = sum(counts)
    if markov:
        rows = sampling.transform(torch.tensor(rolled(dists[-1]), dtype=torch.float64).log()).numpy()
        seen = moves.sum(1, keepdims=True)
        target = (seen * rows / drawn).ravel().tolist()
        counts = moves.ravel().tolist()
        p_value = transition_p_value(moves, rows)
    else:
        target = sampling.transform(torch.tensor(dists[-1], dtype=torch.float64).log().unsqueeze(0))[0].tolist()
        p_value = chi_square_p_value(counts, target)
    empirical = [c / drawn for c in counts]
    tv = 0.5 * sum(abs(e - t) for e, t in zip(empirical, target, strict=True))
    per_proposed = [a / p if p else float("nan") for a, p in zip(accepted, proposed, strict=True)]
    return CheckResult(
        empirical=empirical,
        target=target,
        tv=tv,
        p_value=p_value,
        acceptance=per_proposed,
        samples=samples,
        counts=counts,
        tokens_per_target_forward=drawn / forwards[-1] if forwards and forwards[-1] else float("nan"),
        new_tokens=new_tokens,
        tree=tree,
        replacement=replacement,
        mean_tree_nodes=tree_nodes / tree_rounds if tree_rounds else float("nan"),
        tokens_per_forward=[drawn / f if f else float("nan") for f in forwards],
        policies=[p if isinstance(p, str) else repr(p) for p in spec.parts(regs)[1]],
        block_lengths=ells,
        acceptance_per_try=[a / t if t else float("nan") for a, t in zip(accepted, tries, strict=True)],
        accepted_per_proposed=per_proposed,
    )
