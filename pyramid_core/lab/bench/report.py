"""What ``pyramid bench`` reports: a row per configuration (``BenchRow``), the run
(``BenchResult``: Markdown table, goal ratios, JSON) and the files it writes (``write_bench``:
bench.json, bench.md, the rows as flat tables -- bench.csv and bench.jsonl, one row per line,
each read by one call of ``pandas.read_csv`` / ``pandas.read_json(path, lines=True)`` -- and a
bar plot)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import attrs

from pyramid_core.backends.hf.baseline import HF_GENERATE, HF_GENERATE_FP32
from pyramid_core.lab.outputs import json_text, md_escape

__all__ = ["BenchRow", "BenchResult", "write_bench", "flat_rows", "HF_BASELINE", "TARGET_ALONE"]

HF_BASELINE = HF_GENERATE
TARGET_ALONE = "pyramid target (N=1)"


@attrs.define
class BenchRow:
    """Measured (and, for chains, predicted) numbers of one configuration over all prompts."""

    label: str
    framework: str  # "hf" or "pyramid"
    tokens: int = 0
    wall_s: float = 0.0
    speedup: float = math.nan  # tokens/s over HF generate of the target alone
    target_forwards: int = 0
    acceptance: list[float] = attrs.field(factory=list)  # accepted / proposed per boundary (the old name)
    alpha: list[float] = attrs.field(factory=list)  # per-token alpha (latency.measure_alpha)
    # per boundary: accepted / tries (comparable to alpha and 1 - TV), accepted / proposed
    acceptance_per_try: list[float] = attrs.field(factory=list)
    accepted_per_proposed: list[float] = attrs.field(factory=list)
    # per boundary: accepted / proposed at each draft position (trees: at each depth)
    acceptance_by_position: list[list[float]] = attrs.field(factory=list)
    block_lengths: list[int] = attrs.field(factory=list)
    stages: list[dict[str, Any]] = attrs.field(factory=list)  # name, forwards, forward_s, ms_per_forward
    overhead_fraction: float = math.nan
    predicted_speedup: float | None = None  # T_N / tau_N from the latency model
    predicted_tokens_per_target_forward: float | None = None
    lossless: bool = True
    identical: bool | None = None
    mismatched_prompts: list[str] = attrs.field(factory=list)
    # prompts whose text left the reference at a numerical tie of the dtype ("id@position (margin)")
    ties: list[str] = attrs.field(factory=list)
    # tokens/s over the same framework's decoding of the target alone (pyramid rows: over pyramid
    # N = 1; HF assisted / prompt lookup: over eager HF generate): what speculation itself gains
    gain: float | None = None
    note: str = ""
    # sampled benches (pyramid_core.lab.quality): mean NLL (nats/token) of the emitted text under
    # the target; its paired difference from the target's own text of the same prompt and seed;
    # the price, the excess NLL over the target's own sampler at the same prefixes; each with the
    # half-width of a 95% interval; the next-token TV at the reference's prefixes and its floor
    nll: float | None = None
    nll_delta: float | None = None
    nll_delta_ci95: float | None = None
    price: float | None = None
    price_ci95: float | None = None
    tv: float | None = None
    tv_floor: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def tokens_per_target_forward(self) -> float:
        return self.tokens / self.target_forwards if self.target_forwards else math.nan

    def as_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["tokens_per_s"] = self.tokens_per_s
        out["tokens_per_target_forward"] = self.tokens_per_target_forward
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchRow:
        """The row ``as_dict`` wrote (derived values are recomputed, unknown keys ignored)."""
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@attrs.define
class BenchResult:
    rows: list[BenchRow]
    meta: dict[str, Any]

    @property
    def mismatches(self) -> list[str]:
        """Lossless rows whose greedy output differs from the target's, with the prompts."""
        return [f"{r.label}: prompts {', '.join(r.mismatched_prompts)}" for r in self.rows
                if r.lossless and r.identical is False]

    def row(self, label: str) -> BenchRow:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(f"no bench row {label!r}; rows: {[r.label for r in self.rows]}")

    def as_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": [r.as_dict() for r in self.rows], "mismatches": self.mismatches,
                "goals": self.goals()}

    def goals(self) -> dict[str, Any]:
        """The open performance goals as ratios of this run's rows (speedups are over the
        fastest HF generate configuration measured, ``meta["baseline"]``):

        - pyramid N = 1 over the fastest HF generate in the same dtype (goal >= 1.0), and over the
          float32 eager HF generate of the same run (goal >= 2.0);
        - the best lossless pipeline over the fastest HF generate (goal >= 1.5);
        - framework overhead of every pyramid row (goal <= 3% of wall time);
        - ``ngram -> target`` and the tree of the draft -> target (goal >= 1.3 each);
        - the 3-stage ``sd`` chain (goal >= 1.0);
        - the latency model: on every chain row, the predicted speedup over the target alone
          within 10% of the measured one (the row's tokens/s over pyramid N = 1's);
        - the best pyramid row over the best HF assisted row (lossless rows, and any row;
          goal >= 1.25)."""
        ran = [r for r in self.rows if r.tokens]
        ours = [r for r in ran if r.framework == "pyramid" and len(r.stages) > 1]
        lossless = [r for r in ours if r.lossless and r.identical is not False]
        assisted = [r for r in ran if r.label.startswith("HF assisted")]

        def find(prefix: str) -> BenchRow | None:
            return next((r for r in ran if r.label.startswith(prefix)), None)

        def best(rows: list[BenchRow]) -> BenchRow | None:
            return max(rows, key=lambda r: r.tokens_per_s) if rows else None

        def ratio(a: BenchRow | None, b: BenchRow | None) -> float | None:
            return a.tokens_per_s / b.tokens_per_s if a is not None and b is not None else None

        alone = find(TARGET_ALONE)
        errors = {r.label: abs(r.predicted_speedup - measured) / measured for r in ours
                  if r.predicted_speedup is not None and (measured := ratio(r, alone))}
        b_hf, b_ll, b_any = best(assisted), best(lossless), best(ours)
        sd, ngram, tree = find("sd:"), find("ngram→target"), find("tree draft→target")
        features = [r for r in ran if "feature" in r.label and r.framework == "pyramid"]
        b_feat = best(features)
        trees = [r for r in features if "tree feature→target" in r.label and r.target_forwards]
        feat_tree = max(trees, key=lambda r: r.tokens_per_target_forward, default=None)
        return {
            "baseline": self.meta.get("baseline"),
            "n1_over_baseline": alone.speedup if alone is not None else None,
            "n1_over_float32_eager_hf": ratio(alone, find(HF_GENERATE_FP32)),
            "best_lossless_speedup": b_ll.speedup if b_ll else None,
            "max_overhead_fraction": max((r.overhead_fraction for r in ours), default=None),
            "ngram_speedup": ngram.speedup if ngram is not None else None,
            "tree_speedup": tree.speedup if tree is not None else None,
            "sd_3stage_speedup": sd.speedup if sd is not None else None,
            "prediction_errors": errors,
            "max_prediction_error": max(errors.values(), default=None),
            "best_hf_assisted": b_hf.label if b_hf else None,
            "best_lossless_pipeline": b_ll.label if b_ll else None,
            "best_lossless_over_hf_assisted": ratio(b_ll, b_hf),
            "best_pipeline": b_any.label if b_any else None,
            "best_over_hf_assisted": ratio(b_any, b_hf),
            "best_lossless_overhead_fraction": b_ll.overhead_fraction if b_ll else None,
            "best_feature_row": b_feat.label if b_feat else None,
            "best_feature_speedup": b_feat.speedup if b_feat else None,
            "best_feature_over_hf_assisted": ratio(b_feat, b_hf),
            "best_feature_tree_row": feat_tree.label if feat_tree is not None else None,
            "feature_tree_tokens_per_target_forward":
                feat_tree.tokens_per_target_forward if feat_tree is not None else None,
        }

    def goals_markdown(self) -> str:
        g = self.goals()

        def line(what: str, x: float | None, goal: float, at_least: bool = True, pct: bool = False,
                 unit: str = "×") -> str:
            if x is None:
                return f"- {what}: not measured"
            ok = x >= goal if at_least else x <= goal
            shown = f"{100 * x:.1f}%" if pct else f"{x:.2f}{unit}"
            target = f"{'≥' if at_least else '≤'} {100 * goal:.0f}%" if pct else f"{'≥' if at_least else '≤'} {goal}"
            return f"- {what}: {shown} (goal {target}: {'met' if ok else 'NOT met'})"

        worst = max(g["prediction_errors"].items(), key=lambda kv: kv[1], default=None)
        return "\n".join([
            f"Goals (ratios from this run; speedups over {md_escape(repr(g['baseline']))}, the fastest HF "
            "generate measured):",
            line("pyramid target alone (N=1)", g["n1_over_baseline"], 1.0),
            line("pyramid target alone (N=1) over the float32 eager HF generate", g["n1_over_float32_eager_hf"], 2.0),
            line(f"best lossless pipeline ({md_escape(str(g['best_lossless_pipeline']))})", g["best_lossless_speedup"],
                 1.5),
            line("framework overhead, worst pyramid row", g["max_overhead_fraction"], 0.03, at_least=False, pct=True),
            line("ngram→target", g["ngram_speedup"], 1.3),
            line("tree draft→target", g["tree_speedup"], 1.3),
            line("sd 3-stage", g["sd_3stage_speedup"], 1.0),
            line("latency model, worst |predicted - measured| / measured over the chain rows"
                 + (f" ({md_escape(worst[0])})" if worst else ""), g["max_prediction_error"], 0.10, at_least=False,
                 pct=True),
            line(f"best lossless pipeline ({md_escape(str(g['best_lossless_pipeline']))}) over the best HF assisted "
                 f"({md_escape(str(g['best_hf_assisted']))})", g["best_lossless_over_hf_assisted"], 1.25),
            line(f"best pipeline of any kind ({md_escape(str(g['best_pipeline']))}) over the best HF assisted",
                 g["best_over_hf_assisted"], 1.25),
        ] + ([] if g["best_feature_row"] is None else [
            line(f"best feature row ({md_escape(g['best_feature_row'])})", g["best_feature_speedup"], 1.8),
            line("best feature row over the best HF assisted", g["best_feature_over_hf_assisted"], 1.25),
            line(f"tokens per target forward, best feature tree row ({md_escape(str(g['best_feature_tree_row']))})",
                 g["feature_tree_tokens_per_target_forward"], 3.0, unit=""),
        ])) + "\n"

    @property
    def sampled(self) -> bool:
        return float(self.meta.get("sampling", {}).get("temperature", 0.0)) > 0

    def _mode(self) -> str:
        if not self.sampled:
            return "greedy"
        s = self.meta["sampling"]
        extra = "".join(f", {k} {s[k]}" for k, off in (("top_k", 0), ("top_p", 1.0)) if s.get(k, off) != off)
        return (f"sampled at temperature {s['temperature']}{extra}, {self.meta.get('seeds', 1)} seed(s) per prompt "
                "(price: the excess NLL per token of the text under the target over the target's own sampler "
                "at the same prefixes; NLL Δ: the mean NLL of the text minus that of the target's own text of "
                "the same prompt and seed, paired; both nats/token with 95% intervals; TV: the next-token total "
                "variation from the target at the target's own prefixes, sampled through the rule, beside "
                "what an exact rule shows with as many samples; docs/algorithms.md#the-price-of-a-lossy-rule)")

    @staticmethod
    def _interval(mean: float | None, ci95: float | None) -> str:
        if mean is None or not math.isfinite(mean):
            return "-"
        return f"{mean:+.3f} ± {ci95:.3f}" if ci95 is not None and math.isfinite(ci95) else f"{mean:+.3f}"

    @classmethod
    def _quality(cls, r: BenchRow) -> str:
        tv = "-" if r.tv is None or r.tv_floor is None else f"{r.tv:.3f} ({r.tv_floor:.3f})"
        return f"{cls._interval(r.price, r.price_ci95)} | {cls._interval(r.nll_delta, r.nll_delta_ci95)} | {tv}"

    PRICE_CI_GOAL = 0.1  # nats/token: an interval this tight separates a 0.1-nat rule from an exact one

    def wide_intervals(self) -> list[str]:
        """Rows whose price interval is wider than ``PRICE_CI_GOAL`` (more --seeds or tokens)."""
        return [r.label for r in self.rows
                if r.price_ci95 is not None and math.isfinite(r.price_ci95) and r.price_ci95 > self.PRICE_CI_GOAL]

    def to_markdown(self) -> str:
        def num(x: float | None, fmt: str) -> str:
            return "-" if x is None or not math.isfinite(x) else format(x, fmt)

        sampled = self.sampled
        head = ("| config | tok/s | speedup | gain | predicted | tok/target fwd | acceptance per try | "
                "accepted/proposed | alpha | ms/forward per stage | overhead | "
                + ("price (95% CI) | NLL Δ paired (95% CI) | TV (exact floor) |" if sampled else "identical |"))
        lines = [head, "|" + "---|" * (14 if sampled else 12)]
        for r in self.rows:
            stage_ms = " / ".join(
                f"{md_escape(s['name'])} {num(s['ms_per_forward'], '.1f')}" if s["forwards"]
                else f"{md_escape(s['name'])} -"
                for s in r.stages
            ) or "-"
            ident = "-" if r.identical is None else ("yes" if r.identical else "**NO**")
            if r.identical is False and not r.lossless:
                ident = "no (lossy)"
            elif r.identical and r.ties:
                ident = f"yes ({len(r.ties)} at a tie)"
            lines.append(
                f"| {md_escape(r.label)} | {num(r.tokens_per_s, '.1f')} | {num(r.speedup, '.2f')}x | "
                f"{num(r.gain, '.2f') + ('x' if r.gain is not None else '')} | "
                f"{num(r.predicted_speedup, '.2f') + ('x' if r.predicted_speedup is not None else '')} | "
                f"{num(r.tokens_per_target_forward, '.2f')} | "
                f"{' / '.join(num(a, '.2f') for a in r.acceptance_per_try) or '-'} | "
                f"{' / '.join(num(a, '.2f') for a in r.accepted_per_proposed) or '-'} | "
                f"{' / '.join(num(a, '.2f') for a in r.alpha) or '-'} | {stage_ms} | "
                f"{num(100 * r.overhead_fraction, '.0f') + ('%' if math.isfinite(r.overhead_fraction) else '')} | "
                f"{self._quality(r) if sampled else ident} |"
            )
        notes = [f"- {md_escape(r.label)}: {md_escape(r.note)}" for r in self.rows if r.note]
        notes += [f"- {md_escape(r.label)}: left the reference at a numerical tie of the dtype (the two best "
                  f"logits within its rounding) on {md_escape(', '.join(r.ties))}" for r in self.rows if r.ties]
        m = self.meta
        modes = "; ".join(f"{md_escape(k)}: {md_escape(v)}" for k, v in m.get("modes", {}).items())
        lines += [
            "",
            f"{m['prompts']} prompts, {self._mode()}, up to {m['max_new_tokens']} new tokens each; "
            f"{md_escape(str(m['device']))}; CPU {md_escape(str(m.get('cpu', '?')))}; dtype "
            f"{md_escape(str(m.get('dtype', '?')))} (every row but the float32 reference); execution modes: "
            f"{modes or '-'}. speedup: tokens/s over {md_escape(repr(m['baseline']))} (the fastest HF generate "
            "configuration measured, same dtype); gain: speculation's own -- a pyramid row over pyramid N = 1, "
            "an HF assisted row over eager HF generate, both from this run; "
            "predicted: speedup over the target alone from the latency model (alpha per boundary from this "
            "run, T(M) per stage timed in this run at each number M of tokens a forward feeds, each stage's "
            "prefill as measured; no framework overhead); "
            "acceptance per try: accepted / (accepted + rejections) per boundary, the per-token acceptance "
            "(comparable to alpha and to 1 - TV); accepted/proposed: the share of drafted tokens kept (below "
            "the per-try rate when blocks are longer than 1: tokens after a rejection are never tried); "
            "alpha: per-token acceptance from the per-position counts (i.i.d. fit).",
        ]
        if sampled and (wide := self.wide_intervals()):
            notes.append(f"- price intervals wider than ±{self.PRICE_CI_GOAL} nats/token (too few tokens to decide "
                         f"at that precision: more --seeds or --max-new-tokens): {md_escape(', '.join(wide))}")
        if notes:
            lines += ["", *notes]
        lines += ["", self.goals_markdown().rstrip()]
        if self.mismatches:
            lines += ["", "**GREEDY OUTPUT MISMATCH** (lossless rows differing from the target): "
                      + "; ".join(md_escape(x) for x in self.mismatches)]
        return "\n".join(lines) + "\n"


def _cell(value: Any) -> Any:
    """A flat table's cell: a scalar as is (non-finite floats as ``None``), a list of scalars
    joined by ``;``, anything nested as JSON text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return ";".join(str(_cell(v)) if _cell(v) is not None else "" for v in value)
    return json_text(value, default=str)


def flat_rows(result: BenchResult) -> list[dict[str, Any]]:
    """One flat dict per row, the same keys in every one (``BenchRow.as_dict``; a row's stages
    become ``stage_names`` and ``ms_per_forward``, ``;``-joined), for CSV and JSON Lines."""
    rows = []
    for r in result.rows:
        d = r.as_dict()
        stages = d.pop("stages")
        d["stage_names"] = [s["name"] for s in stages]
        d["ms_per_forward"] = [s["ms_per_forward"] for s in stages]
        rows.append({k: _cell(v) for k, v in d.items()})
    return rows


def write_bench(result: BenchResult, out_dir: str | Path) -> list[Path]:
    """bench.json, bench.md, bench.csv, bench.jsonl (module docstring) and (with matplotlib)
    bench.png in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bench.json", out / "bench.md", out / "bench.csv", out / "bench.jsonl"]
    written[0].write_text(json_text(result.as_dict(), indent=2, default=str))
    written[1].write_text(result.to_markdown())
    table = flat_rows(result)
    columns = list(table[0]) if table else ["label"]
    with written[2].open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(table)
    written[3].write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in table), encoding="utf-8")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    rows = [r for r in result.rows if r.tokens]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5))
    xs = range(len(rows))
    measured = [r.speedup for r in rows]
    predicted = [r.predicted_speedup if r.predicted_speedup is not None else math.nan for r in rows]
    colors = ["tab:gray" if r.framework == "hf" else ("tab:red" if r.identical is False else "tab:blue") for r in rows]
    ax.bar([x - 0.2 for x in xs], measured, width=0.4, color=colors, label="measured (HF: gray)")
    ax.bar([x + 0.2 for x in xs], predicted, width=0.4, color="tab:orange", alpha=0.7, label="predicted (latency model)")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r.label for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"speedup over {result.meta.get('baseline', HF_BASELINE)}")
    ax.set_title(f"pyramid bench: {result.meta.get('target', '')}, draft {result.meta.get('draft', '')}, "
                 f"{result.meta.get('prompts')} prompts x {result.meta.get('max_new_tokens')} tokens", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png = out / "bench.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    written.append(png)
    return written
