"""The fastest configuration within a quality budget (docs/algorithms.md, "Planning within a quality
budget").

Lossy rules (``fuzzy``; PyramidSD's ``psd-a`` and ``psd-f``) trade text quality for speed. Over the
stages given (2 or 3, smallest first, the target last) this module builds the candidates of each
rule family that fits the stage count over a grid of thresholds and block lengths, with the
lossless ``exact`` chains and the target alone as references (``candidates``), measures each on
tuning prompts x seeds -- tokens/s, tokens per target forward, and its price
(``lab.quality.excess_price``: excess NLL under the target, nats/token, 95% interval) --
(``search``, which skips thresholds that cannot qualify), picks the fastest that is within the
budget (``choose``: conservative, the interval's *upper* bound must be within it), and validates
the choice on held-out prompts (``plan_within_budget``).
"""

from __future__ import annotations

import datetime
import itertools
import math
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from pyramid_core.build import PipelineSpec, resolve_preset
from pyramid_core.calibrated import BudgetKey, BudgetRecord, parse_budgeted
from pyramid_core.calibrated import save as save_budgeted
from pyramid_core.errors import ConfigError
from pyramid_core.lab.prompts import Prompt, encode_prompt
from pyramid_core.lab.quality import Price, TokenScores, excess_price, score_text
from pyramid_core.pipeline import Metrics, Pipeline
from pyramid_core.plugins import Registries, registries
from pyramid_core.protocols import Proposer, Stage, tokenizer_of
from pyramid_core.recipes import Preset
from pyramid_core.registry import format_spec, parse_spec
from pyramid_core.types import SamplingConfig
from pyramid_core.validate import check_block_lengths

__all__ = ["LOSSLESS_POLICIES", "is_lossless", "Candidate", "BudgetGrid", "candidates", "Measured", "search",
           "choose", "split_prompts", "measure_candidate", "Validation", "BudgetPlan", "plan_within_budget",
           "plan_within_budgets", "preset_candidates", "calibrate_preset"]

# the built-in rules that sample the target exactly at their boundary; any other policy is treated
# as lossy and must earn its place by its measured price (e.g. `assisted` under `exact`, exact as a
# whole, is priced like a lossy rule: conservative)
LOSSLESS_POLICIES = frozenset({"exact", "block", "traversal"})


def is_lossless(policies: Sequence[str]) -> bool:
    """Every boundary's policy is one of ``LOSSLESS_POLICIES`` (the target alone: no boundary)."""
    return all(parse_spec(p)[0] in LOSSLESS_POLICIES for p in policies)


def _fuzzy(tau: float) -> str:
    return f"fuzzy:div=js,tau={float(tau)!r}"


@attrs.frozen
class Candidate:
    """One configuration: ``rule`` (``"target alone"``, ``"exact"``, ``"fuzzy"``, ``"psd-a"``,
    ``"psd-f"``), ``stages`` (indices into the planned stages, smallest first, the target last), a
    policy spec and a block length per boundary, and ``thresholds``, the fuzzy thresholds of its
    boundaries, bottom first (empty for a lossless rule)."""

    rule: str
    stages: tuple[int, ...]
    policies: tuple[str, ...] = ()
    block_lengths: tuple[int, ...] = ()
    thresholds: tuple[float, ...] = ()

    @property
    def lossless(self) -> bool:
        return is_lossless(self.policies)

    @property
    def ladder(self) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
        """What a threshold ladder shares: the rule, the stages, the block lengths."""
        return (self.rule, self.stages, self.block_lengths)

    def presumed_costlier(self, other: Candidate) -> bool:
        """Same ladder, every threshold at least ``other``'s: a looser rule, presumed to cost at
        least as much (what ``search``'s pruning rests on)."""
        return (self.ladder == other.ladder and bool(self.thresholds)
                and all(a >= b for a, b in zip(self.thresholds, other.thresholds, strict=True)))

    def label(self, names: Sequence[str] | None = None) -> str:
        chain = " -> ".join(names[i] for i in self.stages) if names is not None else ",".join(map(str, self.stages))
        taus = f" tau={','.join(f'{t:g}' for t in self.thresholds)}" if self.thresholds else ""
        lengths = f" l={','.join(map(str, self.block_lengths))}" if self.block_lengths else ""
        return f"{self.rule}{taus}{lengths} [{chain}]"

    def as_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "lossless": self.lossless}


def _check_grid_lengths(_: object, __: object, value: tuple[tuple[int, ...], ...]) -> None:
    for point in value:
        if len(point) not in (1, 2):
            raise ConfigError(f"length grid point {','.join(map(str, point))}: give 1 block length (2-stage "
                              "chains) or 2 (3-stage chains)")
        check_block_lengths(list(point))


def _check_taus(_: object, __: object, value: tuple[float, ...]) -> None:
    bad = [t for t in value if not (math.isfinite(t) and t >= 0)]
    if bad or not value:
        raise ConfigError(f"thresholds: give finite numbers >= 0 (JS is at most ln 2 = 0.693), got {list(value)}")


def _taus(value: Sequence[float]) -> tuple[float, ...]:
    return tuple(sorted(float(t) for t in value))


def _points(value: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(x) for x in p) for p in value)


@attrs.frozen
class BudgetGrid:
    """The search grid: ``taus``, the fuzzy thresholds tried at every fuzzy boundary (JS, nats);
    ``lengths``, block-length points, one length for the 2-stage chains, two (never decreasing
    upwards) for the 3-stage chains."""

    taus: tuple[float, ...] = attrs.field(default=(0.1, 0.3, 0.5), converter=_taus, validator=_check_taus)
    lengths: tuple[tuple[int, ...], ...] = attrs.field(default=((4,), (8,), (4, 8), (8, 16)), converter=_points,
                                                       validator=_check_grid_lengths)


def candidates(n_stages: int, grid: BudgetGrid | None = None) -> list[Candidate]:
    """Every candidate over ``n_stages`` stages (indices 0..n-1, the target last): the target
    alone; ``exact`` on each 2-stage pair into the target and (3 stages) on the whole chain;
    ``fuzzy`` on each pair into the target (2 stages: the FSD family; 3 stages: draft or qualifier
    into the target); with 3 stages ``psd-a`` (``assisted``, fuzzy tau_T) and ``psd-f`` (fuzzy
    tau_Q, fuzzy tau_T) -- each at every threshold and length point of ``grid``."""
    grid = grid or BudgetGrid()
    if n_stages not in (2, 3):
        raise ConfigError(f"planning within a quality budget takes 2 or 3 stages (smallest first, the target "
                          f"last), got {n_stages}")
    target = n_stages - 1
    pairs = [(i, target) for i in range(target)]
    twos = [p for p in grid.lengths if len(p) == 1]
    threes = [p for p in grid.lengths if len(p) == 2] if n_stages == 3 else []
    if not twos and not threes:
        raise ConfigError(f"the length grid {[list(p) for p in grid.lengths]} has no point for {n_stages} stages: "
                          "give 1 block length per point (2-stage chains) or 2 (3-stage chains)")
    out = [Candidate("target alone", (target,))]
    out += [Candidate("exact", pair, ("exact",), lengths) for pair in pairs for lengths in twos]
    out += [Candidate("exact", (0, 1, 2), ("exact", "exact"), lengths) for lengths in threes]
    out += [Candidate("fuzzy", pair, (_fuzzy(t),), lengths, (t,))
            for pair in pairs for lengths in twos for t in grid.taus]
    out += [Candidate("psd-a", (0, 1, 2), ("assisted", _fuzzy(t)), lengths, (t,))
            for lengths in threes for t in grid.taus]
    out += [Candidate("psd-f", (0, 1, 2), (_fuzzy(q), _fuzzy(t)), lengths, (q, t))
            for lengths in threes for q in grid.taus for t in grid.taus]
    return out


def preset_candidates(preset: Preset, n_stages: int, grid: BudgetGrid | None = None) -> list[Candidate]:
    """The budgeted form of ``preset`` over ``n_stages`` stages: its policies with the ``tau`` of
    every ``fuzzy`` boundary set independently to each of ``grid.taus``, at each of the grid's
    length points for ``n_stages`` stages and the preset's own block lengths (candidates of rule
    ``preset.name``), with the references the validation compares against: the target alone and
    ``exact`` over the same stages and lengths. A preset without a fuzzy boundary has nothing to
    set within a budget."""
    grid = grid or BudgetGrid()
    fuzzy = [i for i, p in enumerate(preset.policies) if parse_spec(p)[0] == "fuzzy"]
    if not fuzzy:
        raise ConfigError(f"preset {preset.name!r} has no fuzzy boundary ({', '.join(preset.policies)}): it has no "
                          "threshold to set within a quality budget; run it as it is")
    points = list(dict.fromkeys([p for p in grid.lengths if len(p) == n_stages - 1] + [preset.block_lengths]))
    chain = tuple(range(n_stages))
    out = [Candidate("target alone", (n_stages - 1,))]
    out += [Candidate("exact", chain, ("exact",) * (n_stages - 1), lengths) for lengths in points]
    for lengths in points:
        for taus in itertools.product(grid.taus, repeat=len(fuzzy)):
            policies = list(preset.policies)
            for i, t in zip(fuzzy, taus, strict=True):
                _, params = parse_spec(policies[i])
                policies[i] = format_spec("fuzzy", {**params, "tau": repr(float(t))})
            out.append(Candidate(preset.name, chain, tuple(policies), lengths, tuple(float(t) for t in taus)))
    return out


@attrs.frozen
class Measured:
    """A candidate's figures on a set of prompts x seeds: new tokens, wall seconds, tokens/s,
    tokens per target forward, and ``price`` (``excess_price`` over its texts)."""

    candidate: Candidate
    tokens: int
    wall_s: float
    tokens_per_s: float
    tokens_per_target_forward: float
    price: Price

    def within(self, budget: float) -> bool:
        """Eligible under ``budget``: a lossless rule always (its price is 0 by construction; the
        measured one is noise), a lossy rule when its price's 95% upper bound is at most the
        budget (an undefined interval, from fewer than two texts, never is)."""
        if self.candidate.lossless:
            return True
        return math.isfinite(self.price.high) and self.price.high <= budget

    def as_dict(self) -> dict[str, Any]:
        return {**self.candidate.as_dict(), "tokens": self.tokens, "wall_s": self.wall_s,
                "tokens_per_s": self.tokens_per_s, "tokens_per_target_forward": self.tokens_per_target_forward,
                "price": self.price.as_dict()}


def search(cands: Sequence[Candidate], measure: Callable[[Candidate], Measured], budget: float,
           *, on_measured: Callable[[Measured], object] | None = None) -> tuple[list[Measured], list[Candidate]]:
    """``(measured, skipped)``: every candidate measured in increasing threshold order per ladder
    (the same rule, stages and block lengths), except those ``presumed_costlier`` than a measured
    one whose price's 95% *lower* bound already exceeds ``budget``: on the presumption that a
    looser threshold costs at least as much, they cannot qualify. Lossless candidates are always
    measured. The ladders are interleaved (every ladder's first rung, then every second one...), so
    that a drift of the machine's speed during the search is not charged to one rule family."""
    rungs: dict[tuple[str, tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for i in sorted(range(len(cands)), key=lambda i: cands[i].thresholds):
        rungs.setdefault(cands[i].ladder, []).append(i)
    order = [i for _, i in sorted((rank, i) for ladder in rungs.values() for rank, i in enumerate(ladder))]
    over: list[Candidate] = []  # measured, and surely over the budget
    measured: dict[int, Measured] = {}
    skipped: list[Candidate] = []
    for i in order:
        c = cands[i]
        if any(c.presumed_costlier(o) for o in over):
            skipped.append(c)
            continue
        m = measure(c)
        measured[i] = m
        if on_measured is not None:
            on_measured(m)
        if not c.lossless and math.isfinite(m.price.low) and m.price.low > budget:
            over.append(c)
    return [measured[i] for i in sorted(measured)], skipped


def choose(measured: Sequence[Measured], budget: float, family: str | None = None) -> Measured:
    """The fastest (tokens/s) candidate ``within`` the budget; lossless candidates always are, so
    without a lossy one within it this is the fastest lossless one. With ``family`` (a preset's
    name: ``preset_candidates``), the fastest of that family's candidates within the budget, and a
    ``ConfigError`` naming the cheapest one measured when none is."""
    if family is not None:
        mine = [m for m in measured if m.candidate.rule == family]
        eligible = [m for m in mine if m.within(budget)]
        if not eligible:
            priced = [m for m in mine if math.isfinite(m.price.high)]
            cheapest = min(priced, key=lambda m: m.price.high, default=None)
            best = ("" if cheapest is None else f"; the cheapest measured, {cheapest.candidate.label()}, costs "
                    f"{_price_text(cheapest.price)}")
            raise ConfigError(f"no threshold of {family!r} measured within the budget {budget:g} nats/token at its "
                              f"price's 95% upper bound{best}: try lower --taus, more prompts or seeds (a tighter "
                              "interval), or a larger budget")
        return max(eligible, key=lambda m: m.tokens_per_s)
    eligible = [m for m in measured if m.within(budget)]
    if not eligible:
        raise ConfigError("nothing to choose from: measure the lossless references (the target alone) too")
    return max(eligible, key=lambda m: m.tokens_per_s)


def split_prompts(prompts: Sequence[Prompt], tune_per_kind: int, heldout_per_kind: int) -> tuple[list[Prompt], list[Prompt]]:
    """``(tuning, held_out)``: per task kind, in file order, the first ``tune_per_kind`` prompts
    tune and the next ``heldout_per_kind`` validate (disjoint by construction)."""
    tune: list[Prompt] = []
    held: list[Prompt] = []
    seen: dict[str, int] = {}
    for p in prompts:
        k = seen.get(p.kind, 0)
        seen[p.kind] = k + 1
        if k < tune_per_kind:
            tune.append(p)
        elif k < tune_per_kind + heldout_per_kind:
            held.append(p)
    if not tune or not held:
        raise ConfigError(f"{len(prompts)} prompt(s) give {len(tune)} tuning and {len(held)} held-out prompt(s): "
                          "each kind needs more than the tuning prompts per kind (fewer per kind, or a larger file)")
    return tune, held


PromptLike = Prompt | Sequence[int]


def _encode(prompts: Sequence[PromptLike], target: Stage, chat: bool) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, Prompt):
            tok = tokenizer_of(target)
            if tok is None:
                raise ConfigError(f"the target {target.name!r} has no tokenizer: give the prompts as token ids")
            out.append(encode_prompt(tok, p.text, chat))
        else:
            out.append([int(t) for t in p])
    return out


def measure_candidate(cand: Candidate, stages: Sequence[Stage], encoded: Sequence[Sequence[int]],
                      seeds: Sequence[int], sampling: SamplingConfig, max_new_tokens: int,
                      stop_ids: Sequence[int], regs: Registries | None = None) -> Measured:
    """``cand`` run on every prompt x seed (seed ``1000 * s + i`` for prompt ``i``, as ``bench``
    draws them: the same text seeds for every candidate), each text scored by the target."""
    regs = regs or registries()
    chosen = [stages[i] for i in cand.stages]
    if len(chosen) == 1:
        pipe = Pipeline(chosen, sampling=sampling, stop_ids=list(stop_ids))
    else:
        pipe = PipelineSpec(tuple(chosen), cand.policies, cand.block_lengths, sampling=sampling,
                            stop_ids=tuple(stop_ids)).resolve(regs)
    runs: list[Metrics] = []
    scores: list[TokenScores] = []
    for s in seeds:
        for i, ids in enumerate(encoded):
            gen = pipe.generate(list(ids), max_new_tokens, seed=1000 * s + i)
            runs.append(gen.metrics)
            scores.append(score_text(pipe.target, sampling, ids, gen.token_list))
    m = Metrics.pool(runs)
    return Measured(cand, m.new_tokens, m.wall_s, m.tokens_per_s, m.tokens_per_target_forward, excess_price(scores))


@attrs.frozen
class Validation:
    """The choice, the best lossless candidate and the target alone measured again on the
    held-out prompts (``prompts`` of them, the same seeds)."""

    prompts: int
    chosen: Measured
    lossless: Measured
    alone: Measured
    budget: float

    @property
    def speedup_over_alone(self) -> float:
        return self.chosen.tokens_per_s / self.alone.tokens_per_s if self.alone.tokens_per_s else math.nan

    @property
    def speedup_over_lossless(self) -> float:
        return self.chosen.tokens_per_s / self.lossless.tokens_per_s if self.lossless.tokens_per_s else math.nan

    @property
    def mean_within(self) -> bool:
        """The held-out price's mean is within the budget (lossless: by construction)."""
        return self.chosen.candidate.lossless or self.chosen.price.mean <= self.budget

    @property
    def bound_within(self) -> bool:
        """The held-out price's 95% upper bound is within the budget (the tuning rule, again)."""
        return self.chosen.within(self.budget)

    def as_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "chosen": self.chosen.as_dict(), "lossless": self.lossless.as_dict(),
                "alone": self.alone.as_dict(), "speedup_over_alone": self.speedup_over_alone,
                "speedup_over_lossless": self.speedup_over_lossless, "mean_within": self.mean_within,
                "bound_within": self.bound_within}


def _price_text(p: Price) -> str:
    return f"{p.mean:+.3f} ± {p.ci95:.3f}" if math.isfinite(p.ci95) else f"{p.mean:+.3f} ± ?"


@attrs.frozen
class BudgetPlan:
    """What ``plan_within_budget`` measured and chose: ``stages`` (names, smallest first, the
    target last), every measured candidate (the frontier), those skipped by the pruning, the
    ``chosen`` one, the best lossless one, and the held-out ``validation``."""

    stages: tuple[str, ...]
    budget: float
    sampling: SamplingConfig
    max_new_tokens: int
    seeds: tuple[int, ...]
    tuning_prompts: int
    measured: tuple[Measured, ...]
    skipped: tuple[Candidate, ...]
    chosen: Measured
    best_lossless: Measured
    validation: Validation | None = None
    preset: str | None = None  # a budgeted preset's calibration: the preset's name

    @property
    def lossy_within(self) -> list[Measured]:
        return [m for m in self.measured if not m.candidate.lossless and m.within(self.budget)]

    @property
    def verdict(self) -> str:
        """One line: what was chosen and why."""
        c = self.chosen
        what = f"{c.candidate.label(self.stages)}: {c.tokens_per_s:.1f} tokens/s, price {_price_text(c.price)}"
        if not c.candidate.lossless:
            return (f"chosen {what} -- the fastest candidate whose price's 95% upper bound is within the budget "
                    f"{self.budget:g} nats/token (conservative)")
        if not self.lossy_within:
            return (f"no lossy candidate's price is within the budget {self.budget:g} nats/token at its 95% upper "
                    f"bound: the fastest lossless one, {what}")
        return f"chosen {what} -- lossless, and faster than every lossy candidate within the budget"

    def generate_args(self) -> list[str]:
        """``--stage``, ``--policy``, ``--length`` and sampling options of ``pyramid generate`` for
        the chosen configuration."""
        c = self.chosen.candidate
        args = [a for i in c.stages for a in ("--stage", self.stages[i])]
        if self.preset is not None and c.rule == self.preset:
            args += ["--preset", f"{self.preset}:budget={self.budget:g}"]
        else:
            args += [a for p in c.policies for a in ("--policy", p)]
            args += [a for n in c.block_lengths for a in ("--length", str(n))]
        s = self.sampling
        args += ["--temperature", f"{s.temperature:g}"]
        if s.top_k:
            args += ["--top-k", str(s.top_k)]
        if s.top_p < 1.0:
            args += ["--top-p", f"{s.top_p:g}"]
        return args

    def generate_command(self, *, device: str | None = None, chat: bool = True, prompt: str = "YOUR PROMPT") -> str:
        """A ready ``pyramid generate`` command line running the choice."""
        return shlex.join(["pyramid", "generate", *self.generate_args(),
                           "--max-new-tokens", str(self.max_new_tokens), *(["--device", device] if device else []),
                           *([] if chat else ["--no-chat"]), "--prompt", prompt])

    def to_markdown(self, *, frontier: bool = True) -> str:
        """The measured candidates (the frontier, fastest first), the verdict and the held-out
        validation; ``frontier=False``: the verdict and the validation only."""
        head = ("| rule | stages | thresholds | lengths | tok/s | tokens/target fwd | price (95% CI) | within |\n"
                "|---|---|---|---|---|---|---|---|")
        rows = []
        for m in sorted(self.measured, key=lambda m: -m.tokens_per_s):
            c = m.candidate
            mark = "chosen" if m is self.chosen else ("lossless" if c.lossless else ("yes" if m.within(self.budget) else "no"))
            rows.append(f"| {c.rule} | {' → '.join(self.stages[i] for i in c.stages)} | "
                        f"{','.join(f'{t:g}' for t in c.thresholds) or '-'} | {','.join(map(str, c.block_lengths)) or '-'} | "
                        f"{m.tokens_per_s:.1f} | {m.tokens_per_target_forward:.2f} | {_price_text(m.price)} | {mark} |")
        s = self.sampling
        lines = ([head, *rows, ""] if frontier else []) + [
                 f"Tuning: {self.tuning_prompts} prompt(s) x {len(self.seeds)} seed(s), {self.max_new_tokens} new tokens, "
                 f"temperature {s.temperature:g}" + (f", top-k {s.top_k}" if s.top_k else "")
                 + (f", top-p {s.top_p:g}" if s.top_p < 1 else "")
                 + f". Price: excess NLL under the target (nats/token, 95% interval over texts). A lossy candidate is "
                 f"within the budget when its interval's upper bound is at most {self.budget:g} (conservative); "
                 "lossless ones always are." + (f" Skipped by the pruning (a lower threshold's price was already surely over the "
                                  f"budget): {len(self.skipped)}." if self.skipped else ""),
                 "", self.verdict]
        v = self.validation
        if v is not None:
            lines += ["", f"Held-out validation ({v.prompts} prompt(s) x {len(self.seeds)} seed(s), disjoint from the "
                          "tuning prompts):", "",
                      "| configuration | tok/s | tokens/target fwd | price (95% CI) |", "|---|---|---|---|"]
            roles: dict[Candidate, list[str]] = {}
            for role, m in (("chosen", v.chosen), ("best lossless", v.lossless), ("target alone", v.alone)):
                roles.setdefault(m.candidate, []).append(role)
            for m in (v.chosen, v.lossless, v.alone):
                if m.candidate in roles:
                    lines.append(f"| {' = '.join(roles.pop(m.candidate))}: {m.candidate.label(self.stages)} | "
                                 f"{m.tokens_per_s:.1f} | {m.tokens_per_target_forward:.2f} | {_price_text(m.price)} |")
            lines += ["", f"speedup {v.speedup_over_alone:.2f}x over the target alone, {v.speedup_over_lossless:.2f}x "
                          f"over the best lossless; held-out price "
                          + ("0 by construction (lossless)" if v.chosen.candidate.lossless else
                             f"{_price_text(v.chosen.price)}: mean {'within' if v.mean_within else 'OVER'} the budget, "
                             f"upper bound {'within' if v.bound_within else 'over'} it")]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"stages": list(self.stages), "budget": self.budget, "sampling": attrs.asdict(self.sampling),
                "max_new_tokens": self.max_new_tokens, "seeds": list(self.seeds), "tuning_prompts": self.tuning_prompts,
                "candidates": [m.as_dict() for m in self.measured],
                "skipped": [c.as_dict() for c in self.skipped], "chosen": self.chosen.as_dict(),
                "best_lossless": self.best_lossless.as_dict(), "verdict": self.verdict,
                "validation": None if self.validation is None else self.validation.as_dict()}


def plan_within_budget(stages: Sequence[str | Stage | Proposer], budget: float, tune_prompts: Sequence[PromptLike],
                       heldout_prompts: Sequence[PromptLike], **kwargs: Any) -> BudgetPlan:
    """``plan_within_budgets`` at one budget."""
    return plan_within_budgets(stages, [budget], tune_prompts, heldout_prompts, **kwargs)[0]


def plan_within_budgets(
    stages: Sequence[str | Stage | Proposer],
    budgets: Sequence[float],
    tune_prompts: Sequence[PromptLike],
    heldout_prompts: Sequence[PromptLike],
    *,
    sampling: SamplingConfig,
    seeds: Sequence[int] = (0, 1, 2),
    max_new_tokens: int = 32,
    grid: BudgetGrid | None = None,
    preset: Preset | None = None,
    names: Sequence[str] | None = None,
    chat: bool = True,
    device: str | None = None,
    compile: Any = None,
    dtype: str | None = None,
    regs: Registries | None = None,
    progress: bool = False,
) -> list[BudgetPlan]:
    """The fastest configuration of ``stages`` (2 or 3, smallest first, the target last: specs or
    loaded model stages) whose price is within each of ``budgets`` (nats/token), and its held-out
    check: one ``BudgetPlan`` per budget, in the order given, over one search.

    Every ``candidates`` entry (with ``preset``: ``preset_candidates``, the preset's budgeted
    form, and the choice is among the preset's candidates) is measured on ``tune_prompts`` x
    ``seeds`` with ``sampling`` (``search`` at the largest budget: a threshold is not raised
    further once a lower one's price is surely over it, and so over every smaller budget too);
    the choice (``choose``) is conservative: a lossy rule qualifies only when the *upper* bound of
    its price's 95% interval is within the budget; without one, the fastest lossless
    configuration is chosen. The choice, the best lossless configuration and the target alone
    are then run again on ``heldout_prompts`` (which must not share a prompt with the tuning
    ones) with the same sampling and seeds (each configuration once, whatever the number of
    budgets). ``names``: how the stages are written in the output and ``generate_command``
    (default: the specs, or the stages' names). Prompts are ``Prompt`` (encoded with the
    target's tokenizer, chat template per ``chat``) or token ids.
    """
    from tqdm import tqdm

    regs = regs or registries()
    budgets = [float(b) for b in budgets]
    bad = [b for b in budgets if not (math.isfinite(b) and b >= 0)]
    if not budgets or bad:
        raise ConfigError(f"a quality budget is an excess NLL in nats/token, a finite number >= 0; got "
                          f"{bad[0] if bad else 'none'!r}")
    if not seeds:
        raise ConfigError("give at least one seed")
    if not tune_prompts or not heldout_prompts:
        raise ConfigError("give both tuning and held-out prompts")
    grid = grid or BudgetGrid()
    # the stage count and grid checked before loading
    cands = candidates(len(stages), grid) if preset is None else preset_candidates(preset, len(stages), grid)
    family = None if preset is None else preset.name
    loaded = PipelineSpec(tuple(stages), device=device, compile=compile, dtype=dtype).load_stages(regs)
    models: list[Stage] = []
    for i, s in enumerate(loaded):
        if not isinstance(s, Stage):
            raise ConfigError(f"stage {i + 1} ({getattr(s, 'name', s)!r}) is a model-free proposer: fuzzy rules "
                              "compare rows, so planning within a quality budget takes model stages only")
        models.append(s)
    labels = tuple(names) if names is not None else tuple(s if isinstance(s, str) else str(getattr(s, "name", s))
                                                          for s in stages)
    target = models[-1]
    tune = _encode(tune_prompts, target, chat)
    held = _encode(heldout_prompts, target, chat)
    shared = {tuple(t) for t in tune} & {tuple(h) for h in held}
    if shared:
        raise ConfigError(f"{len(shared)} held-out prompt(s) are also tuning prompts: the validation needs prompts "
                          "the choice was not made on (split them, e.g. lab.budget.split_prompts)")
    eos = getattr(tokenizer_of(target), "eos_token_id", None)
    stop_ids = [] if eos is None else [int(eos)]
    seeds = tuple(int(s) for s in seeds)

    def run(c: Candidate, prompts: list[list[int]]) -> Measured:
        return measure_candidate(c, models, prompts, seeds, sampling, max_new_tokens, stop_ids, regs)

    # warm-up, not recorded: every chain and block lengths once, exact, on one prompt -- a timed run
    # must not pay for a first call at a new shape
    for shape in dict.fromkeys((c.stages, c.block_lengths) for c in cands):
        warm = Candidate("exact", shape[0], ("exact",) * len(shape[1]), shape[1])
        measure_candidate(warm, models, tune[:1], seeds[:1], sampling, min(8, max_new_tokens), stop_ids, regs)
    with tqdm(total=len(cands), desc="plan within budget", disable=not progress) as bar:
        measured, skipped = search(cands, lambda c: run(c, tune), max(budgets), on_measured=lambda _: bar.update())
        bar.update(len(skipped))
    best_lossless = max((m for m in measured if m.candidate.lossless), key=lambda m: m.tokens_per_s)
    alone = next(m for m in measured if m.candidate.rule == "target alone")
    again: dict[Candidate, Measured] = {}

    def held_out(c: Candidate) -> Measured:
        if c not in again:
            again[c] = run(c, held)
        return again[c]

    plans = []
    for budget in budgets:
        chosen = choose(measured, budget, family)
        for c in (alone.candidate, best_lossless.candidate, chosen.candidate):
            held_out(c)
        validation = Validation(len(held), again[chosen.candidate], again[best_lossless.candidate],
                                again[alone.candidate], budget)
        plans.append(BudgetPlan(labels, budget, sampling, max_new_tokens, seeds, len(tune), tuple(measured),
                                tuple(skipped), chosen, best_lossless, validation, family))
    return plans


def calibrate_preset(
    preset: str,
    stages: Sequence[str],
    budgets: Sequence[float],
    tune_prompts: Sequence[PromptLike],
    heldout_prompts: Sequence[PromptLike],
    *,
    sampling: SamplingConfig,
    regs: Registries | None = None,
    store: Path | None = None,
    command: str = "",
    **kwargs: Any,
) -> list[tuple[BudgetPlan, BudgetRecord]]:
    """The budgeted form of ``preset`` (a registered preset's name, e.g. ``"psd-f"``) for
    ``stages`` (specs: a record is looked up by them) at each of ``budgets``: planned by
    ``plan_within_budgets(..., preset=...)`` and recorded (``pyramid_core.calibrated``, in
    ``store``, default its ``store_path()``), so that ``preset="psd-f:budget=B"`` with the same
    stage specs and sampler resolves to the choice. A budget that none of the preset's
    thresholds meets is an error naming the cheapest, and nothing is recorded for any budget.
    ``command``: how it was run, kept in the record; other arguments as ``plan_within_budgets``."""
    regs = regs or registries()
    specs = [str(s) for s in stages]
    if any(not isinstance(s, str) for s in stages):
        raise ConfigError("calibrate_preset records the choice under the stages' specs: give them as specs "
                          "(e.g. 'smollm2:stage=draft'), not loaded stages")
    name, budget_param = parse_budgeted(preset)
    if budget_param is not None:
        raise ConfigError(f"give the preset's name ({name!r}) and the budgets separately, not {preset!r}")
    resolved = resolve_preset(name, len(specs), regs=regs)
    plans = plan_within_budgets(specs, budgets, tune_prompts, heldout_prompts, sampling=sampling, preset=resolved,
                                regs=regs, **kwargs)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out = []
    for plan in plans:
        c, v = plan.chosen, plan.validation
        assert v is not None
        record = BudgetRecord(BudgetKey(name, tuple(specs), plan.budget, sampling), c.candidate.policies,
                              c.candidate.block_lengths, c.candidate.thresholds, c.tokens_per_s,
                              (c.price.mean, c.price.ci95), (v.chosen.price.mean, v.chosen.price.ci95), when, command)
        out.append((plan, record))
    for _, record in out:
        save_budgeted(record, store)
    return out
