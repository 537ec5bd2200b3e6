"""The price of a lossy rule: how much its text costs under the target, per token, measured
tightly enough to decide (docs/algorithms.md, "The price of a lossy rule").

- ``score_text``: one target forward over a generated text gives, per token, its NLL under the
  target (temperature 1) and that NLL's expectation under the target's own sampler at the same
  prefix (the *control*: ``sum_x p_T(x) * -log p(x)``, ``p_T`` the sampling transform of the run).
- ``excess_price``: ``sum(NLL - control) / tokens`` over every text (a ratio estimator), with a
  95% interval over texts. At each prefix an exact rule's excess has mean 0 (its token is drawn
  from ``p_T``), so the interval carries the per-token noise only, not the spread between prompts
  that an NLL difference between two sets of texts carries. It is the rule's expected excess NLL
  at the prefixes it visits: it does not see where those prefixes lead.
- ``paired_delta``: per (prompt, seed), the mean NLL of the rule's text minus that of the target's
  own text of the same prompt and seed; mean and 95% interval over the pairs. It sees the drift of
  the prefixes too, at the price of a wider interval.
- ``first_token_tv``: a second, independent measure: the total variation between the rule's and
  the target's next-token distributions at given prefixes, the rule's estimated by sampling its
  real policies on the stages' real rows (restricted to the top of the distributions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import numpy as np
import torch
from scipy import stats as scipy_stats
from torch import Tensor

from pyramid_core.errors import ConfigError
from pyramid_core.pipeline import Pipeline
from pyramid_core.protocols import Stage
from pyramid_core.types import Block, SamplingConfig

__all__ = ["TokenScores", "Price", "score_text", "excess_price", "paired_delta", "first_token_tv", "TVEstimate"]


@attrs.frozen(eq=False)
class TokenScores:
    """Per token of one text: ``nll`` (``Float[Tensor, "n"]``, nats under the target at
    temperature 1) and ``control`` (its expectation under the target's own sampler there)."""

    nll: Tensor
    control: Tensor

    @property
    def tokens(self) -> int:
        return int(self.nll.numel())

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean()) if self.tokens else math.nan


@attrs.frozen
class Price:
    """An estimate in nats/token with its 95% interval (``mean +- ci95``) over ``n`` texts or
    pairs; ``ci95`` is NaN with fewer than two."""

    mean: float
    ci95: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.ci95

    @property
    def high(self) -> float:
        return self.mean + self.ci95

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci95": self.ci95, "n": self.n}


def _t95(n: int) -> float:
    return float(scipy_stats.t.ppf(0.975, n - 1)) if n > 1 else math.nan


def score_text(target: Stage, sampling: SamplingConfig, prompt: Sequence[int], tokens: Sequence[int]) -> TokenScores:
    """``TokenScores`` of ``tokens`` after ``prompt`` from one forward of ``target``."""
    device = target.device
    toks = torch.tensor(list(tokens), dtype=torch.long, device=device)
    if not len(toks):
        empty = torch.zeros(0, dtype=torch.float64)
        return TokenScores(empty, empty)
    context = torch.tensor(list(prompt), dtype=torch.long, device=device)
    logits = target.score(context, Block(toks, toks.new_zeros(len(toks), 0, dtype=torch.float32)))[:-1]
    logp = torch.log_softmax(logits.double(), dim=-1)  # rows: "n vocab"
    nll = -logp.gather(-1, toks.unsqueeze(-1)).squeeze(-1)
    p_t = sampling.transform(logits.double())
    # sum_x p_T(x) * -log p(x), over the support of p_T only (a truncated sampler's zeros times an
    # infinite -log p would be NaN)
    control = torch.where(p_t > 0, p_t * -logp, torch.zeros_like(p_t)).sum(-1)
    return TokenScores(nll.cpu(), control.cpu())


def excess_price(scores: Sequence[TokenScores]) -> Price:
    """``sum(nll - control) / sum(tokens)`` over ``scores`` (texts without tokens are skipped),
    with the 95% interval of a ratio estimator over texts (t quantile, n - 1 degrees of freedom)."""
    kept = [s for s in scores if s.tokens]
    if not kept:
        return Price(math.nan, math.nan, 0)
    sums = np.array([float((s.nll - s.control).sum()) for s in kept])
    counts = np.array([s.tokens for s in kept], dtype=np.float64)
    ratio = float(sums.sum() / counts.sum())
    n = len(kept)
    if n < 2:
        return Price(ratio, math.nan, n)
    residual = sums - ratio * counts
    var = n / (n - 1) * float((residual**2).sum()) / float(counts.sum()) ** 2
    return Price(ratio, _t95(n) * math.sqrt(var), n)


def paired_delta(rule: Sequence[TokenScores], reference: Sequence[TokenScores]) -> Price:
    """Mean over pairs (the same index: the same prompt and seed) of the rule's mean NLL minus the
    reference's, with a t interval; pairs where either text is empty are skipped."""
    if len(rule) != len(reference):
        raise ConfigError(f"paired_delta pairs texts by index: {len(rule)} texts against {len(reference)}")
    diffs = [a.mean_nll - b.mean_nll for a, b in zip(rule, reference, strict=True) if a.tokens and b.tokens]
    n = len(diffs)
    if n == 0:
        return Price(math.nan, math.nan, 0)
    mean = float(np.mean(diffs))
    if n < 2:
        return Price(mean, math.nan, n)
    return Price(mean, _t95(n) * float(np.std(diffs, ddof=1)) / math.sqrt(n), n)


@attrs.frozen
class TVEstimate:
    """``tv``: mean over prefixes of the total variation between the rule's next-token distribution
    (sampled ``samples`` times) and the target's; ``floor``: the same for ``samples`` draws from
    the target itself (what an exact rule shows); ``support``: the mean number of tokens kept."""

    tv: float
    floor: float
    prefixes: int
    samples: int
    support: float

    @property
    def excess(self) -> float:
        return self.tv - self.floor

    def as_dict(self) -> dict[str, float | int]:
        return {**attrs.asdict(self), "excess": self.excess}


def _rows(stage: Stage, prefix: Sequence[int], sampling: SamplingConfig) -> Tensor:
    context = torch.tensor(list(prefix), dtype=torch.long, device=stage.device)
    stage.reset()
    return sampling.transform(stage.score(context, None)[-1:].double())[0].cpu()


def first_token_tv(pipe: Pipeline, prefixes: Sequence[Sequence[int]], *, top: int = 32, samples: int = 2000,
                   seed: int = 0) -> TVEstimate:
    """``TVEstimate`` of ``pipe``'s rule at each prefix: every stage's next-token row there (its
    sampling transform applied), restricted to the union of each row's ``top`` most likely tokens
    and renormalised, drives ``pyramid check``'s sampler (``run_check``) through the pipeline's own
    policies and block lengths. Model stages only (no model-free proposer, no tree: both are
    refused); the restriction hides the tails, which a rule rarely reaches."""
    from pyramid_core.testing.exactness import run_check

    stages: list[Stage] = []
    for s in pipe.stages:
        if isinstance(s, Stage):
            stages.append(s)
        else:  # a model-free proposer or a token-tree wrapper
            raise ConfigError(f"first_token_tv needs chains of model stages with rows; {getattr(s, 'name', s)!r} "
                              "proposes without one (a token tree's rules are lossless: exact, traversal)")
    if not prefixes:
        raise ConfigError("first_token_tv needs at least one prefix")
    gen = np.random.default_rng(seed)
    tvs, floors, sizes = [], [], []
    for k, prefix in enumerate(prefixes):
        rows = [_rows(s, prefix, pipe.sampling) for s in stages]
        keep = torch.unique(torch.cat([r.topk(min(top, len(r))).indices for r in rows]))
        dists = [(r[keep] / r[keep].sum()).tolist() for r in rows]
        result = run_check(dists, list(pipe.policies), list(pipe.block_lengths), samples=samples, seed=seed + k)
        tvs.append(result.tv)
        target = np.asarray(dists[-1], dtype=np.float64)
        draws = gen.multinomial(samples, target / target.sum()) / samples
        floors.append(0.5 * float(np.abs(draws - target).sum()))
        sizes.append(len(keep))
    for s in stages:
        s.reset()
    return TVEstimate(float(np.mean(tvs)), float(np.mean(floors)), len(prefixes), samples, float(np.mean(sizes)))
