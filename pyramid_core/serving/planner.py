"""How many tokens to draft in vLLM's next step: the block length that maximises the expected
tokens per second of the whole step, from what the last steps measured ([serving with
vLLM](../../serving.md), "Adaptive block length").

A step of B running requests, each given a block of k draft tokens, costs

    T(B, k) = a_k + b * B * (1 + k)   vLLM's step over B (1 + k) query tokens; a_0 for a step
                                      without drafts, a_1 for one with (vLLM verifies then:
                                      multi-token queries, the rejection sampler)
            + d * B * k               the lower chain drafting (d: seconds per drafted token and row)

and emits B * E(alpha, k) tokens, E = expected_tokens (the accepted prefix plus the target's own
token; ``docs/algorithms.md``, "Expected tokens per verification"). The planner picks the k in
0..K with the largest B * E(alpha, k) / T(B, k); k = 0 is vLLM's plain decoding step. It learns
online, each statistic forgetting geometrically as observations of its own kind arrive:

- ``a_0, a_1, b`` by least squares over (tokens, seconds) of the engine's steps, one intercept
  for steps with drafts and one for steps without, a shared slope with a ridge toward 0 (until
  steps of different sizes have been seen, extra tokens count as free: the optimistic choice,
  which drafts, and so measures); once steps with drafts have been timed it takes one step
  without, to time that kind too;
- ``d`` from the lower chain's own time per drafted token;
- ``alpha`` by maximum likelihood under the i.i.d. acceptance model: a block of length L of which
  m tokens were accepted tested m + 1 tokens (m successes) when m < L, and L tokens when m = L.
With a lookup in front of the chain (``LowerChain.lookup``) its blocks are sized apart: their
acceptance is learned on its own (``lookup_alpha``) and their tokens cost only the verification
(d = 0), so ``choose_lookup`` may offer the lookup's tokens in steps where drafting does not pay.

On a CPU the verification of k extra tokens at batch 1 costs little and drafting can pay; with
many requests vLLM's batched forward is already efficient while the lanes of the lower chain draft
one request after another, and the planner stops drafting (k = 0) when that no longer pays.
"""

from __future__ import annotations

import attrs

from pyramid_core.errors import ConfigError
from pyramid_core.schedule import expected_tokens

__all__ = ["StepPlanner"]


@attrs.define
class StepPlanner:
    """The online cost model and the choice of block length (module docstring).

    ``max_k``: vLLM's ``num_speculative_tokens``; ``memory``: the weight a past observation keeps
    per new one (0 < memory <= 1); ``prior_alpha``: the acceptance rate assumed before any
    verdict, held with the weight of ``prior_weight`` tested tokens."""

    max_k: int
    memory: float = 0.95
    prior_alpha: float = 0.5
    prior_weight: float = 2.0
    ridge: float = 1e-6
    # least squares of step seconds on step tokens: weighted sums (1, x, x^2, y, xy) for steps
    # without drafts (row 0) and with (row 1)
    sums: list[list[float]] = attrs.field(factory=lambda: [[0.0] * 5, [0.0] * 5])
    # acceptance: accepted and tested tokens (weighted), the prior included
    accepted: float = attrs.field(init=False)
    tested: float = attrs.field(init=False)
    # lower chain: seconds and drafted tokens (weighted)
    draft_seconds: float = 0.0
    draft_tokens: float = 0.0
    # the lookup's blocks (``choose_lookup``): accepted and tested tokens, the prior included
    lookup_accepted: float = attrs.field(init=False)
    lookup_tested: float = attrs.field(init=False)
    chosen_lookup: dict[int, int] = attrs.field(factory=dict)
    steps_seen: int = 0
    chosen: dict[int, int] = attrs.field(factory=dict)

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

    def record_verdict(self, offered: int, accepted: int, *, lookup: bool = False) -> None:
        """vLLM kept ``accepted`` of a block of ``offered`` draft tokens (``lookup``: a block the
        lookup proposed)."""
        if offered < 1:
            return
        if not 0 <= accepted <= offered:
            raise ConfigError(f"accepted {accepted} of a block of {offered} tokens")
        tested = accepted + (1 if accepted < offered else 0)
        m = self.memory ** (1.0 / 8.0)  # verdicts come B per step: forget them more slowly
        if lookup:
            self.lookup_accepted = m * self.lookup_accepted + accepted
            self.lookup_tested = m * self.lookup_tested + tested
        else:
            self.accepted = m * self.accepted + accepted
            self.tested = m * self.tested + tested

    # --- what it believes ----------------------------------------------------------------------

    @property
    def alpha(self) -> float:
        return min(self.accepted / self.tested, 1.0 - 1e-6)

    @property
    def lookup_alpha(self) -> float:
        return min(self.lookup_accepted / self.lookup_tested, 1.0 - 1e-6)

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

    def rate(self, rows: int, k: int, *, lookup: bool = False) -> float | None:
        """Expected tokens per second of a step of ``rows`` requests with blocks of ``k`` (drafted,
        or with ``lookup`` the lookup's: its acceptance, no drafting cost)."""
        cost, d = self.step_cost(), (0.0 if lookup else self.draft_cost)
        if cost is None or (k > 0 and d is None):
            return None
        a0, a1, b = cost
        seconds = (a1 if k else a0) + b * rows * (1 + k) + (d or 0.0) * rows * k
        alpha = self.lookup_alpha if lookup else self.alpha
        return rows * expected_tokens(alpha, k) / seconds if seconds > 0 else None

    def choose_lookup(self, rows: int, *, fixed: bool = False) -> int:
        """The longest block the lookup may propose in a step of ``rows`` decoding requests:
        ``max_k`` until the step's costs are measured (or always, with ``fixed``), then the k in
        0..max_k with the highest expected rate at the lookup's acceptance and no drafting cost."""
        best = None if fixed else self._fastest(rows, lookup=True)
        k = self.max_k if best is None else best
        self.chosen_lookup[k] = self.chosen_lookup.get(k, 0) + 1
        return k

    def _fastest(self, rows: int, *, lookup: bool = False) -> int | None:
        """The k in 0..max_k with the highest expected rate (the shortest on a tie), or None while
        some rate cannot be computed yet (costs not measured)."""
        rates = [self.rate(rows, k, lookup=lookup) for k in range(self.max_k + 1)]
        if any(r is None for r in rates):
            return None
        return max(range(self.max_k + 1), key=lambda j: (rates[j], -j))

    def choose(self, rows: int, *, fixed: bool = False) -> int:
        """The block length for a step of ``rows`` decoding requests: ``max_k`` until the costs
        have been measured (or always, with ``fixed``), then one step without drafts if none has
        been timed yet, then the k in 0..max_k with the highest expected rate."""
        best = None if fixed else self._fastest(rows)
        if best is None:
            k = self.max_k
        elif self.sums[0][0] == 0:
            k = 0  # time a step without drafts once: it may cost less than the linear model says
        else:
            k = best
        self.chosen[k] = self.chosen.get(k, 0) + 1
        return k
