"""``pyramid sweep``: a preset over a grid of thresholds and block lengths, with quality.

Quality is measured offline against the target itself: the mean per-token negative
log-likelihood of the generated text under the target (temperature 1, no truncation), the price
(the excess of that NLL over the target's own sampler at the same prefixes, with a 95% interval:
``lab.quality.excess_price``) and the agreement with the target's own greedy output (exact-match
of the whole continuation, and the fraction of positions that agree).
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from pyramid_core.build import PipelineSpec, resolve_preset
from pyramid_core.errors import ConfigError
from pyramid_core.lab.outputs import RecordLog, json_text
from pyramid_core.lab.prompts import Prompt, encode_prompt
from pyramid_core.lab.quality import TokenScores, excess_price, score_text
from pyramid_core.pipeline import Metrics, Pipeline
from pyramid_core.plugins import Registries, registries
from pyramid_core.protocols import Proposer, Stage, tokenizer_of
from pyramid_core.registry import format_spec, parse_spec
from pyramid_core.types import SamplingConfig

__all__ = ["SweepPoint", "with_tau", "run_sweep", "write_sweep"]


def with_tau(spec: str, tau: float, regs: Registries) -> str:
    """The policy spec with ``tau`` set when its policy takes a ``tau`` parameter (a
    divergence threshold, e.g. ``fuzzy``), else unchanged."""
    name, params = parse_spec(spec)
    if not regs.policies.accepts(name, "tau"):
        return spec
    params["tau"] = repr(float(tau))
    return format_spec(name, params)


@attrs.frozen
class SweepPoint:
    label: str
    tau: float | None
    block_lengths: tuple[int, ...]
    policies: tuple[str, ...]
    tokens: int
    wall_s: float
    tokens_per_s: float
    tokens_per_target_forward: float
    acceptance: tuple[float, ...]  # accepted / proposed per boundary (BoundaryStats.accepted_per_proposed)
    nll: float
    exact_match: float
    token_match: float
    # accepted / tries per boundary, comparable to alpha and 1 - TV (BoundaryStats.acceptance_per_try)
    acceptance_per_try: tuple[float, ...] = ()
    price: float = math.nan  # nats/token over the target's own sampler (lab.quality.excess_price)
    price_ci95: float = math.nan

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepPoint:
        """A point as ``attrs.asdict`` wrote it to a ``RecordLog`` (lists back to tuples)."""
        names = {f.name for f in attrs.fields(cls)}
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return cls(**fields)


def _agreement(out: list[int], ref: list[int]) -> float:
    n = max(len(out), len(ref))
    return sum(a == b for a, b in zip(out, ref)) / n if n else 1.0


def _measure(label: str, tau: float | None, policies: Sequence[str], pipe: Pipeline, encoded: list[list[int]], refs: list[list[int]],
             max_new_tokens: int, seed: int) -> SweepPoint:
    runs: list[Metrics] = []
    nlls: list[float] = []
    scores: list[TokenScores] = []
    exact = 0
    agree = 0.0
    for i, (ids, ref) in enumerate(zip(encoded, refs)):
        gen = pipe.generate(ids, max_new_tokens, seed=seed + i)
        runs.append(gen.metrics)
        out = gen.token_list
        scores.append(score_text(pipe.target, pipe.sampling, ids, out))
        nlls.append(scores[-1].mean_nll)
        exact += out == ref
        agree += _agreement(out, ref)
    m = Metrics.pool(runs)
    finite = [x for x in nlls if math.isfinite(x)]
    price = excess_price(scores)
    return SweepPoint(
        label=label, tau=tau, block_lengths=tuple(pipe.block_lengths),
        policies=tuple(policies), tokens=m.new_tokens, wall_s=m.wall_s,
        tokens_per_s=m.tokens_per_s, tokens_per_target_forward=m.tokens_per_target_forward,
        acceptance=tuple(b.accepted_per_proposed for b in m.boundaries),
        acceptance_per_try=tuple(b.acceptance_per_try for b in m.boundaries),
        nll=sum(finite) / len(finite) if finite else float("nan"),
        exact_match=exact / len(encoded), token_match=agree / len(encoded),
        price=price.mean, price_ci95=price.ci95,
    )


def run_sweep(
    spec: PipelineSpec,
    taus: Sequence[float],
    prompts: Sequence[Prompt],
    *,
    length_grid: Sequence[Sequence[int]] | None = None,
    max_new_tokens: int = 32,
    seed: int = 0,
    chat: bool = True,
    progress: bool = True,
    presets: Sequence[str] | None = None,
    regs: Registries | None = None,
    log: RecordLog | None = None,
) -> list[SweepPoint]:
    """Measure the target alone, then each preset (``presets``, default the spec's own) at every
    (tau, block lengths) grid point -- the speed-quality frontier of each -- every stage loaded
    once. Without a ``length_grid`` each preset runs at its own block lengths. ``log``: the
    greedy references and each point are appended as soon as they are measured, and what the log
    already holds (a rerun after an interruption, same arguments) is taken from it."""
    from tqdm import tqdm

    regs = regs or registries()
    names = list(presets) if presets else ([spec.preset] if spec.preset else [])
    if not names:
        raise ConfigError("a sweep runs presets over their tau values: give one or more presets")
    spec = spec.loaded(regs) if spec.preset else attrs.evolve(spec, preset=names[0]).loaded(regs)
    base = spec.resolve(regs)
    loaded: list[Stage | Proposer] = list(base.stages)
    target = base.target
    tok = tokenizer_of(target)
    if tok is None:
        raise ConfigError(f"sweep needs a target stage with a tokenizer; {target.name!r} has none")
    encoded = [encode_prompt(tok, p.text, chat) for p in prompts]
    done = log.get("refs") if log is not None else None
    if done is not None:
        refs: list[list[int]] = done["refs"]
    else:
        greedy = Pipeline([target], sampling=SamplingConfig.greedy(), stop_ids=base.stop_ids)
        refs = [greedy.generate(ids, max_new_tokens).token_list for ids in encoded]
        if log is not None:
            log.append("refs", {"refs": refs})

    def recorded(key: str) -> SweepPoint | None:
        record = log.get(key) if log is not None else None
        return None if record is None else SweepPoint.from_dict(record["point"])

    def keep(key: str, point: SweepPoint) -> SweepPoint:
        if log is not None:
            log.append(key, {"point": attrs.asdict(point)})
        return point

    alone = Pipeline([target], sampling=spec.sampling, stop_ids=base.stop_ids)
    first = recorded("target alone") or keep(
        "target alone", _measure("target alone", None, (), alone, encoded, refs, max_new_tokens, seed))
    points = [first]
    jobs = []
    for name in names:
        plan = resolve_preset(name, len(loaded), regs=regs)
        grids = [tuple(g) for g in length_grid] if length_grid else [tuple(plan.block_lengths)]
        jobs += [(name, plan, tau, lengths) for lengths in grids for tau in taus]
    for name, plan, tau, lengths in tqdm(jobs, desc=f"sweep {', '.join(names)}", disable=not progress):
        key = f"{name} tau={tau!r} lengths={','.join(map(str, lengths))}"
        done_point = recorded(key)
        if done_point is not None:
            points.append(done_point)
            continue
        policies = [with_tau(s, tau, regs) for s in plan.policies]
        point = attrs.evolve(spec, stages=tuple(loaded), preset=None, policies=tuple(policies),
                             block_lengths=tuple(lengths), stop_ids=tuple(base.stop_ids))
        points.append(keep(key, _measure(name, tau, policies, point.resolve(regs), encoded, refs,
                                         max_new_tokens, seed)))
    return points


def write_sweep(points: Sequence[SweepPoint], out_dir: str | Path, *, title: str = "",
                run: Mapping[str, Any] | None = None, budget: float | None = None) -> list[Path]:
    """sweep.json, sweep.csv and (with matplotlib) sweep.png in ``out_dir``; ``run``: what the
    run was (``lab.provenance.run_record``), recorded in sweep.json; ``budget``: a quality budget
    (nats/token), recorded and drawn on the price panel."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [attrs.asdict(p) for p in points]
    written = [out / "sweep.json", out / "sweep.csv"]
    body: dict[str, Any] = {"title": title, "points": rows, "time": time.time()}
    if run is not None:
        body["run"] = dict(run)
    if budget is not None:
        body["quality_budget"] = budget
    written[0].write_text(json_text(body, indent=2))
    with written[1].open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (";".join(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in r.items()})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    base = points[0]
    swept = [p for p in points if p.tau is not None]
    for label, lengths in sorted({(p.label, p.block_lengths) for p in swept}):
        sel = [p for p in swept if p.block_lengths == lengths and p.label == label]
        lab = f"{label}, l=" + ",".join(map(str, lengths))
        a1.plot([p.tau for p in sel], [p.tokens_per_s for p in sel], "o-", label=lab)
        a2.errorbar([p.tokens_per_s for p in sel], [p.price for p in sel], yerr=[p.price_ci95 for p in sel],
                    fmt="o-", capsize=2, label=lab)
        for p in sel:
            a2.annotate(f"τ={p.tau:g}", (p.tokens_per_s, p.price), fontsize=7)
    a1.axhline(base.tokens_per_s, color="gray", ls="--", label="target alone")
    a2.errorbar([base.tokens_per_s], [base.price], yerr=[base.price_ci95], color="gray", fmt="s", label="target alone")
    a2.axhline(0.0, color="gray", lw=0.5)
    if budget is not None:
        a2.axhline(budget, color="tab:red", ls=":", label=f"quality budget {budget:g}")
    a1.set(xlabel="τ (divergence threshold)", ylabel="tokens/s", title="throughput vs τ")
    a2.set(xlabel="tokens/s", ylabel="price: excess NLL under the target (nats/token, 95% CI)",
           title="speed-quality frontier per preset")
    for a in (a1, a2):
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = out / "sweep.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    written.append(png)
    return written
