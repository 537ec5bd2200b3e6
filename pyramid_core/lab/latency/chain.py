"""``predict_chain``: what the latency model predicts for an N-stage exact chain, in the steady
state or over a finite horizon (``pyramid_core.lab.latency.horizon``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import attrs

from pyramid_core.errors import ConfigError
from pyramid_core.lab.latency.cost import ForwardCost, as_forward_cost, real_or_nan
from pyramid_core.lab.latency.forms import check_alpha, expected_tokens
from pyramid_core.lab.latency.horizon import Lengths, finite_horizon
from pyramid_core.validate import check_block_lengths

__all__ = ["Prediction", "predict_chain"]


@attrs.frozen
class Prediction:
    """What the latency model predicts for a chain.

    tokens_per_target_forward: expected output tokens per forward of the target (incl. bonus)
    time_per_token:            expected seconds per output token
    forwards_per_token:        expected forwards of each stage per output token, smallest first
    target_time_per_token:     T_N, the target alone's seconds per token (one forward each)
    """

    tokens_per_target_forward: float
    time_per_token: float
    forwards_per_token: tuple[float, ...]
    target_time_per_token: float

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.time_per_token if self.time_per_token > 0 else math.inf

    @property
    def speedup(self) -> float:
        """Predicted speedup over the target decoding alone (T_N per token)."""
        return self.target_time_per_token / self.time_per_token if self.time_per_token > 0 else math.inf



def _lengths(ell: int | Mapping[int, float], k: int) -> Lengths:
    """A block length, or a distribution of lengths {ell: weight}, as a normalised distribution."""
    where = f"block length at boundary {k + 1} -> {k + 2}"
    if isinstance(ell, Mapping):
        items = [(m, real_or_nan(w)) for m, w in ell.items()]
        bad = [(m, w) for m, w in items if isinstance(m, bool) or not isinstance(m, int) or m < 0 or not w >= 0]
        if bad or not items:
            raise ConfigError(f"{where}: a length distribution maps integer lengths >= 0 to weights >= 0, got {dict(ell)}")
        total = sum(w for _, w in items)
        if not 0 < total < math.inf:
            raise ConfigError(f"{where}: the length distribution has no mass ({dict(ell)})")
        return tuple((m, w / total) for m, w in sorted(items) if w > 0)
    if isinstance(ell, bool) or not isinstance(ell, int) or ell < 1:
        raise ConfigError(f"{where} must be an integer >= 1 (or a distribution of lengths), got {ell!r}")
    return ((ell, 1.0),)



def predict_chain(
    alphas: Sequence[float],
    block_lengths: Sequence[int | Mapping[int, float]],
    forward_times: Sequence[float | ForwardCost],
    *,
    new_tokens: int | None = None,
) -> Prediction:
    """Predict an [N-stage exact chain](../../algorithms.md#the-exact-n-stage-chain) from alpha and ell per boundary and
    the forward cost per stage: seconds per forward as a float (0 for a model-free proposer such
    as ``ngram``), or a ``ForwardCost`` T(M) of the tokens M a forward feeds.

    Steady state (``new_tokens=None``), from the recursion of the pipeline: stage 1 samples
    autoregressively, one forward of one new token per drafted token; stage k >= 2 verifies
    blocks of ell_{k-1} tokens from stage k-1 in one forward that feeds the block and the token
    it emitted last, M = ell_{k-1} + 1, and, under the i.i.d. assumption (``pyramid_core.lab.latency``),
    emits E_k = expected_tokens(alpha_{k-1}, ell_{k-1}) tokens per forward of its own. So the
    seconds per token tau_k and forwards f_k^{(j)} of stage j per token of stage k are::

        tau_1 = T_1(1),                   f_1^{(1)} = 1
        tau_k = (ell_{k-1} tau_{k-1} + T_k(ell_{k-1} + 1)) / E_k
        f_k^{(j)} = ell_{k-1} f_{k-1}^{(j)} / E_k  (j < k),   f_k^{(k)} = 1 / E_k

    and the target emits E_N tokens per forward, at 1 / tau_N tokens/s; the speedup over the
    target alone (one forward of one token per token) is T_N(1) / tau_N (N = 2 with flat costs,
    T_1 = c T_2: ``pair_speedup``). The steady state ignores that a lower stage asked for ell
    tokens discards the surplus of its last round, and that the first forward of a stage after
    the stage above accepted all of its output feeds 1 .. N-1 tokens more (both cost extra).

    ``new_tokens=n`` instead computes the exact expectation (under the same i.i.d. assumption)
    for one generation of n tokens with the pipeline's budget rule -- each round asks the stage
    below for min(ell, tokens still needed) tokens, and tokens beyond the request are cut -- and
    with every forward charged at the exact number of tokens it feeds (``finite_horizon``),
    prefill excluded. With flat costs both reduce to the T-per-forward model of the papers.

    A block length may also be a distribution ``{ell: probability}`` (e.g. the realised lengths of
    an adaptive schedule, ``measure.length_distributions``): the steady state then averages
    tokens per round E(alpha, ell), tokens asked ell and the verification's T(ell + 1) over it,
    and the finite horizon draws ell per round (``finite_horizon``).

    Fixed block lengths must not decrease from the bottom boundary up, as in ``Pipeline``: a lower
    length larger than the one above it cannot take effect (``validate.check_block_lengths``),
    and predicting a cost for it would describe a pipeline that does not run.
    """
    n = len(forward_times)
    if n < 1:
        raise ConfigError("predict_chain needs the forward time of at least one stage (the target)")
    if len(alphas) != n - 1 or len(block_lengths) != n - 1:
        raise ConfigError(
            f"{n} stages need {n - 1} alphas and {n - 1} block lengths (one per boundary), got "
            f"{len(alphas)} and {len(block_lengths)}"
        )
    alphas = [check_alpha(a, f"alpha at boundary {k + 1} -> {k + 2}") for k, a in enumerate(alphas)]
    if all(isinstance(ell, int) for ell in block_lengths):
        block_lengths = check_block_lengths(block_lengths)  # the pipeline's rule: none can be capped
    dists = [_lengths(ell, k) for k, ell in enumerate(block_lengths)]
    costs = [as_forward_cost(t, f"stage {k + 1}") for k, t in enumerate(forward_times)]
    t_target = costs[-1].decode
    if new_tokens is not None:
        if not isinstance(new_tokens, int) or new_tokens < 1:
            raise ConfigError(f"new_tokens must be an integer >= 1, got {new_tokens!r}")
        total, forwards = finite_horizon(alphas, dists, costs, new_tokens)
        per = tuple(f / new_tokens for f in forwards)
        return Prediction(1.0 / per[-1], total / new_tokens, per, t_target)
    tau = costs[0].decode
    f = [1.0]
    for k in range(1, n):  # means over the boundary's length distribution (one length: the fixed case)
        dist = dists[k - 1]
        ell = sum(p * m for m, p in dist)
        e = sum(p * expected_tokens(alphas[k - 1], m) for m, p in dist)
        tau = (ell * tau + sum(p * costs[k](m + 1) for m, p in dist)) / e
        f = [ell * x / e for x in f] + [1.0 / e]
    return Prediction(1.0 / f[-1], tau, tuple(f), t_target)

