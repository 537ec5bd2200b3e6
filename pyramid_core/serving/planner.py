"""How many tokens to offer each request in vLLM's next step: the block lengths that maximise the
expected tokens per second of the whole step, from what the last steps measured ([serving with
vLLM](../../serving.md), "Adaptive block length").

A step of B running requests, row i given a block of k_i tokens, costs

    T = a + b * (B + sum k_i)         vLLM's step over its query tokens; a = a_0 for a step
                                      without drafts, a_1 for one with (vLLM verifies then:
                                      multi-token queries, the rejection sampler)
        + d * (drafted tokens)        the lower chain drafting (d: seconds per drafted token and row;
                                      a lookup's tokens cost no drafting)

and emits B + sum_i sum_{j <= k_i} c_ij tokens, c_ij the probability that the first j tokens of
row i's block are accepted: alpha^j for a drafted block (alpha under the i.i.d. model,
``docs/algorithms.md``, "Expected tokens per verification"), and for a lookup's block the
product of per-position acceptances learned by the block's *support* (``support``: how many
tokens before the proposed one repeat a run the context already holds; a long repeat is a
copy, a one-token match mostly chance). The planner maximises that ratio by Dinkelbach's
iteration: at the current rate R each row independently takes the block (lookup prefix, drafted
prefix or none) with the most sum c_ij - R * cost, the step takes drafts at all only if they
beat the intercept a_1 - a_0, R becomes the new set's rate, until R stops rising (it converges
to the optimum; within a row c_ij falls with j, so the best set is a prefix). Every row that
drafts gets the same length (same alpha, same cost); a lookup's blocks are cut row by row. It
learns online, each statistic forgetting geometrically as observations of its own kind arrive:

- ``a_0, a_1, b`` by least squares over (tokens, seconds) of the engine's steps, one intercept
  for steps with drafts and one for steps without, a shared slope with a ridge toward 0 (until
  steps of different sizes have been seen, extra tokens count as free: the optimistic choice,
  which drafts, and so measures); once steps with drafts have been timed it takes one step
  without, to time that kind too;
- ``d`` from the lower chain's own time per drafted token (0, optimistically, until measured);
- ``alpha`` by maximum likelihood under the i.i.d. acceptance model: a block of length L of which
  m tokens were accepted tested m + 1 tokens (m successes) when m < L, and L tokens when m = L;
- a lookup's acceptance per support bucket (``SUPPORT_EDGES``) and position: position j of a
  block was tested when the j - 1 before it were accepted;
- and an acceptance estimate that no verdict reached in a step forgets a little, toward its
  prior: one that is no longer observed (drafting stopped paying, a bucket not offered) returns
  to the prior, is offered again and so measured again.

On a CPU the verification of k extra tokens at batch 1 costs little and drafting pays; with many
requests vLLM's batched forward is already efficient (the step's cost is mostly per token), so
only the rows whose next tokens are nearly certain -- long repeats -- are worth a block, and the
planner offers nothing to the others (k = 0: vLLM's plain decoding for that row).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import attrs
import numpy as np

from pyramid_core.errors import ConfigError
from pyramid_core.schedule import expected_tokens

__all__ = ["SUPPORT_EDGES", "Offer", "StepPlanner", "support", "support_bucket"]

SUPPORT_EDGES = (0, 1, 2, 3, 4, 6, 8)
"""Lower edges of the support buckets a lookup's acceptance is learned by (support 4-5 share one,
6-7 one, 8 and more one)."""


def support(context: np.ndarray, token: int, cap: int = SUPPORT_EDGES[-1]) -> int:
    """The longest n <= ``cap`` such that the context's last n tokens followed by ``token`` occur
    in the context: how long a run the context already holds a proposal continues (0: the token
    never follows the context's last token there)."""
    ctx = np.asarray(context)
    size = len(ctx)
    at = np.flatnonzero(ctx[1:] == token) + 1  # where the token stands after at least one token
    n = 0
    while n < min(cap, size) and at.size:
        at = at[at - 1 - n >= 0]
        at = at[ctx[at - 1 - n] == ctx[size - 1 - n]]
        if at.size:
            n += 1
    return n


def support_bucket(n: int) -> int:
    """The index of the support bucket of ``n`` (``SUPPORT_EDGES``)."""
    return bisect.bisect_right(SUPPORT_EDGES, n) - 1


@attrs.frozen
class Offer:
    """What one decoding row may be given: ``room`` tokens at most (the request's length limit),
    and the lookup's block for it, ``lookup`` tokens long (0: none) with ``bucket`` its support
    bucket."""

    room: int
    lookup: int = 0
    bucket: int = 0


@attrs.define
class StepPlanner:
    """The online cost model and the choice of block lengths (module docstring).

    ``max_k``: vLLM's ``num_speculative_tokens``; ``memory``: the weight a past observation keeps
    per new one (0 < memory <= 1); ``prior_alpha``: the acceptance rate assumed before any
    verdict, held with the weight of ``prior_weight`` tested tokens (for drafts, and for each
    support bucket and position of a lookup's blocks)."""

    max_k: int
    memory: float = 0.95
    prior_alpha: float = 0.5
    prior_weight: float = 2.0
    ridge: float = 1e-6
    # least squares of step seconds on step tokens: weighted sums (1, x, x^2, y, xy) for steps
    # without drafts (row 0) and with (row 1)
    sums: list[list[float]] = attrs.field(factory=lambda: [[0.0] * 5, [0.0] * 5])
    # acceptance of drafted blocks: accepted and tested tokens (weighted), the prior included
    accepted: float = attrs.field(init=False)
    tested: float = attrs.field(init=False)
    # lower chain: seconds and drafted tokens (weighted)
    draft_seconds: float = 0.0
    draft_tokens: float = 0.0
    # the lookup's blocks: accepted and tested tokens pooled (``lookup_alpha``), and by support
    # bucket and position (``lookup_by_support[bucket][j]``: [accepted, tested]), priors included
    lookup_accepted: float = attrs.field(init=False)
    lookup_tested: float = attrs.field(init=False)
    lookup_by_support: list[list[list[float]]] = attrs.field(init=False)
    chosen_lookup: dict[int, int] = attrs.field(factory=dict)  # lookup blocks by length
    steps_seen: int = 0
    chosen: dict[int, int] = attrs.field(factory=dict)  # steps by the length of their drafted blocks
    observed: set[int | None] = attrs.field(factory=set)  # kinds with a verdict since the last step (None: drafts)

    def __attrs_post_init__(self) -> None:
        if self.max_k < 1:
            raise ConfigError(f"the planner needs num_speculative_tokens >= 1, got {self.max_k}")
        if not 0.0 < self.memory <= 1.0:
            raise ConfigError(f"planner memory must be in (0, 1], got {self.memory}")
        if not 0.0 <= self.prior_alpha < 1.0 or self.prior_weight <= 0:
            raise ConfigError(f"planner prior: alpha in [0, 1) and a positive weight, got {self.prior_alpha}, "
                              f"{self.prior_weight}")
        self.accepted = self.lookup_accepted = self.prior_alpha * self.prior_weight
        self.tested = self.lookup_tested = self.prior_weight
        self.lookup_by_support = [[[self.prior_alpha * self.prior_weight, self.prior_weight]
                                   for _ in range(self.max_k)] for _ in SUPPORT_EDGES]

    # --- what was measured ---------------------------------------------------------------------

    def record_step(self, tokens: int, seconds: float, drafted: bool = True) -> None:
        """vLLM's step over ``tokens`` query tokens (decoding rows and their drafts) took
        ``seconds``; ``drafted``: some row of it had draft tokens to verify."""
        if tokens < 1 or not seconds > 0:
            return
        x, y = float(tokens), float(seconds)
        row = self.sums[int(drafted)]
        row[:] = [self.memory * v + new for v, new in zip(row, (1.0, x, x * x, y, x * y), strict=True)]
        self.steps_seen += 1

    def record_draft(self, tokens: int, seconds: float) -> None:
        """The lower chain spent ``seconds`` drafting ``tokens`` tokens (all rows of one step)."""
        if tokens < 1:
            return
        self.draft_seconds = self.memory * self.draft_seconds + seconds
        self.draft_tokens = self.memory * self.draft_tokens + tokens

    def record_verdict(self, offered: int, accepted: int, *, bucket: int | None = None) -> None:
        """vLLM kept ``accepted`` of a block of ``offered`` draft tokens; ``bucket``: the support
        bucket of a block the lookup proposed (None: a drafted block)."""
        if offered < 1:
            return
        if not 0 <= accepted <= offered:
            raise ConfigError(f"accepted {accepted} of a block of {offered} tokens")
        if bucket is not None and not 0 <= bucket < len(SUPPORT_EDGES):
            raise ConfigError(f"support bucket {bucket} is not one of 0..{len(SUPPORT_EDGES) - 1}")
        tested = accepted + (1 if accepted < offered else 0)
        m = self.memory ** (1.0 / 8.0)  # verdicts come B per step: forget them more slowly
        self.observed.add(bucket)
        if bucket is None:
            self.accepted, self.tested = self._forget((self.accepted, self.tested), m, (accepted, tested))
            return
        self.lookup_accepted, self.lookup_tested = self._forget((self.lookup_accepted, self.lookup_tested), m,
                                                                (accepted, tested))
        for j, cell in enumerate(self.lookup_by_support[bucket]):
            cell[:] = self._forget((cell[0], cell[1]), m, (float(j < accepted), float(j < min(tested, self.max_k))))

    def _forget(self, pair: tuple[float, float], m: float, new: tuple[float, float] = (0.0, 0.0)) -> list[float]:
        """(accepted, tested) with the prior's share kept and what was observed weighted by ``m``,
        plus ``new``."""
        prior = (self.prior_alpha * self.prior_weight, self.prior_weight)
        return [p + m * (v - p) + n for v, p, n in zip(pair, prior, new, strict=True)]

    def _age(self) -> None:
        """One step's forgetting, toward its prior, of each acceptance estimate that no verdict
        reached since the last step: one that is not observed for a while (drafting stopped
        paying, a support bucket not offered) returns to the prior, is offered again, and so
        measured again."""
        m = self.memory ** 0.25  # slowly: re-offering a bucket offers it to every row of its kind at once
        if None not in self.observed:
            self.accepted, self.tested = self._forget((self.accepted, self.tested), m)
        for bucket, cells in enumerate(self.lookup_by_support):
            if bucket not in self.observed:
                for cell in cells:
                    cell[:] = self._forget((cell[0], cell[1]), m)
        self.observed.clear()

    # --- what it believes ----------------------------------------------------------------------

    @property
    def alpha(self) -> float:
        return min(self.accepted / self.tested, 1.0 - 1e-6)

    @property
    def lookup_alpha(self) -> float:
        """The lookup's acceptance pooled over all its blocks (i.i.d. model; for the record: the
        planner prices a lookup's blocks by ``lookup_cumulative``)."""
        return min(self.lookup_accepted / self.lookup_tested, 1.0 - 1e-6)

    def lookup_cumulative(self, bucket: int) -> list[float]:
        """c_j for j = 1..max_k: the probability that the first j tokens of a lookup block of
        support bucket ``bucket`` are accepted."""
        out, c = [], 1.0
        for accepted, tested in self.lookup_by_support[bucket]:
            c *= min(accepted / tested, 1.0 - 1e-6)
            out.append(c)
        return out

    @property
    def draft_cost(self) -> float | None:
        """Seconds per drafted token and row, or None before the chain has drafted."""
        return self.draft_seconds / self.draft_tokens if self.draft_tokens > 0 else None

    def step_cost(self) -> tuple[float, float, float] | None:
        """(a_0, a_1, b) of the engine's step time a_k + b * tokens (a_0 without drafts, a_1
        with), or None before a step was measured; a kind of step not measured yet takes the
        other's intercept."""
        seen = [r for r in self.sums if r[0] > 0]
        if not seen:
            return None
        # shared slope from the variation within each kind: b = sum cov / (sum var + ridge)
        cov = sum(r[4] - r[1] * r[3] / r[0] for r in seen)
        var = sum(r[2] - r[1] * r[1] / r[0] for r in seen)
        b = max(cov / (var + self.ridge * sum(r[2] for r in seen)), 0.0)
        a = [max((r[3] - r[1] * b) / r[0], 0.0) if r[0] > 0 else None for r in self.sums]
        a0, a1 = a
        return (a0 if a0 is not None else a1 or 0.0), (a1 if a1 is not None else a0 or 0.0), b

    def rate(self, rows: int, k: int) -> float | None:
        """Expected tokens per second of a step of ``rows`` requests each given a drafted block of
        ``k``, or None before the costs are measured."""
        cost, d = self.step_cost(), self.draft_cost
        if cost is None or (k > 0 and d is None):
            return None
        a0, a1, b = cost
        seconds = (a1 if k else a0) + b * rows * (1 + k) + (d or 0.0) * rows * k
        return rows * expected_tokens(self.alpha, k) / seconds if seconds > 0 else None

    # --- what it chooses -----------------------------------------------------------------------

    def choose(self, rows: int, *, fixed: bool = False) -> int:
        """The drafted block length for a step of ``rows`` decoding requests and no lookup
        (``plan`` of rows that may each take ``max_k``)."""
        return max(k for k, _ in self.plan([Offer(self.max_k)] * max(rows, 1), fixed=fixed))

    def plan(self, offers: Sequence[Offer], *, fixed: bool = False) -> list[tuple[int, bool]]:
        """For each decoding row of a step (``offers``), the length of its block and whether the
        lookup's block (cut to that length) is offered rather than a drafted one. ``max_k`` (the
        lookup's whole block where it has one) until the step's costs are measured, or always
        with ``fixed``; then one step without drafts if none has been timed yet; then the most
        tokens per second (module docstring). A drafted block is never longer than ``max_k``,
        nor any block than its row's room."""
        if not offers:
            return []
        self._age()
        if fixed or self.step_cost() is None:
            out = [(min(o.lookup, o.room), True) if o.lookup else (min(self.max_k, o.room), False) for o in offers]
        elif self.sums[0][0] == 0:
            out = [(0, False)] * len(offers)  # time a step without drafts once: it may cost less than the model says
        else:
            out = self._fastest(offers)
        drafted = max((k for k, looked in out if not looked), default=0)
        self.chosen[drafted] = self.chosen.get(drafted, 0) + 1
        for k, looked in out:
            if looked and k:
                self.chosen_lookup[k] = self.chosen_lookup.get(k, 0) + 1
        return out

    def _fastest(self, offers: Sequence[Offer]) -> list[tuple[int, bool]]:
        """Dinkelbach's iteration for the most expected tokens per second (module docstring)."""
        cost = self.step_cost()
        assert cost is not None
        a0, a1, b = cost
        d = self.draft_cost or 0.0  # not measured yet: drafting counts as free, so it drafts and measures
        rows = len(offers)
        drafted = np.cumsum(self.alpha ** np.arange(1, self.max_k + 1))  # sum of c_j, j <= k
        by_bucket = {bucket: np.cumsum(self.lookup_cumulative(bucket))
                     for bucket in {o.bucket for o in offers if o.lookup}}
        looked = [by_bucket[o.bucket][: min(o.lookup, o.room)] if o.lookup else drafted[:0] for o in offers]
        rate = self.rate(rows, 0)  # vLLM's plain step: where the iteration starts
        if rate is None:
            return [(0, False)] * rows
        best: list[tuple[int, bool]] = [(0, False)] * rows
        for _ in range(32):
            choice: list[tuple[int, bool]] = []
            gain = spent = value = 0.0
            for o, gains in zip(offers, looked, strict=True):
                top = (0.0, 0, False, 0.0, 0.0)  # value, length, from the lookup, gain, seconds
                for j, g in enumerate(gains, 1):
                    if (v := g - rate * b * j) > top[0]:
                        top = (v, j, True, g, b * j)
                for j in range(1, min(self.max_k, o.room) + 1):
                    if (v := drafted[j - 1] - rate * (b + d) * j) > top[0]:
                        top = (v, j, False, drafted[j - 1], (b + d) * j)
                choice.append((top[1], top[2]))
                value, gain, spent = value + top[0], gain + top[3], spent + top[4]
            if not any(k for k, _ in choice) or value <= rate * (a1 - a0):
                return best  # no set with drafts beats the rate reached: ``best`` reached it
            new = (rows + gain) / (a1 + b * rows + spent)
            if new <= rate * (1 + 1e-12):
                return best
            rate, best = new, choice
        return best
