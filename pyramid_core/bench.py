"""``pyramid bench``: our pipelines next to Hugging Face decoding, same prompts, same machine,
greedy, one run.

Rows: the target alone with HF ``generate`` (the baseline every speedup is relative to), HF
assisted generation (``assistant_model=`` the draft model) and HF prompt-lookup decoding, when
the installed transformers supports them; then pyramid pipelines: the target alone (N = 1),
``ngram -> target``, ``draft -> target``, ``ngram -> draft -> target`` and a token-tree draft.

Every lossless row's greedy output is compared, prompt by prompt, with the target's greedy
output from HF ``generate``; a mismatch is recorded in the result (and the CLI exits non-zero).
For chain pipelines the latency model (``pyramid_core.latency.predict_chain``, finite horizon)
predicts the speedup from alpha per boundary and the forward cost T(M) per stage measured in the
same run, M being the number of tokens a forward feeds.

Why T(M) is timed rather than taken from the pipeline metrics: the metrics count forwards and
positions per stage, not the tokens each forward fed nor the time per M, and nearly all of a
row's verifications feed the same M = ell + 1 -- one point of a curve that on a CPU is far from
flat (docs/algorithms.md). So each model stage is timed once per run, the first time a row needs
it, at every M = 1 .. (longest block length + 2) that ``predict_chain`` may charge
(``plan.measure_stage_costs``: warm-up + 5 timed forwards per M, after a context of the mean
prompt length + half the new tokens), and reused by every row with that stage. A model-free
first stage keeps the time the metrics measured (0: its cost is framework overhead).
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from pyramid_core.build import build_pipeline
from pyramid_core.latency import ForwardCost, measure_alpha, measure_forward_time, predict_chain
from pyramid_core.pipeline import Metrics, Pipeline
from pyramid_core.plan import measure_stage_costs
from pyramid_core.prompts import Prompt
from pyramid_core.protocols import AcceptancePolicy, Proposer, Stage
from pyramid_core.sweep import encode_prompt
from pyramid_core.types import SamplingConfig

__all__ = ["BenchConfig", "BenchRow", "BenchResult", "default_configs", "run_bench", "write_bench"]

HF_BASELINE = "HF generate (target)"


@attrs.frozen
class BenchConfig:
    """One pyramid pipeline to benchmark: stages smallest first (specs or loaded stages), a
    policy and a block length per boundary, an optional tree proposer spec. ``lossless``
    configurations are asserted token-identical to the target's greedy output."""

    label: str
    stages: tuple[str | Stage | Proposer, ...]
    policies: tuple[str | AcceptancePolicy, ...] = ()
    block_lengths: tuple[int, ...] = ()
    tree: str | None = None
    lossless: bool = True


@attrs.define
class BenchRow:
    """Measured (and, for chains, predicted) numbers of one configuration over all prompts."""

    label: str
    framework: str  # "hf" or "pyramid"
    tokens: int = 0
    wall_s: float = 0.0
    speedup: float = math.nan  # tokens/s over HF generate of the target alone
    target_forwards: int = 0
    acceptance: list[float] = attrs.field(factory=list)  # accepted / proposed per boundary
    alpha: list[float] = attrs.field(factory=list)  # per-token alpha (latency.measure_alpha)
    block_lengths: list[int] = attrs.field(factory=list)
    stages: list[dict[str, Any]] = attrs.field(factory=list)  # name, forwards, forward_s, ms_per_forward
    overhead_fraction: float = math.nan
    predicted_speedup: float | None = None  # T_N / tau_N from the latency model
    predicted_tokens_per_target_forward: float | None = None
    lossless: bool = True
    identical: bool | None = None
    mismatched_prompts: list[str] = attrs.field(factory=list)
    note: str = ""

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
        """The issue's performance goals as ratios of this run's rows: the 3-stage ``sd`` chain
        over the target alone (goal >= 2.0), the best pyramid row over the best HF assisted row
        (goal >= 1.25; lossless rows, and any row), framework overhead of the pyramid rows
        (goal <= 5%)."""
        ran = [r for r in self.rows if r.tokens]
        ours = [r for r in ran if r.framework == "pyramid" and len(r.stages) > 1]
        lossless = [r for r in ours if r.lossless and r.identical is not False]
        assisted = [r for r in ran if r.label.startswith("HF assisted")]
        sd = next((r for r in ran if r.label.startswith("sd:")), None)

        def best(rows: list[BenchRow]) -> BenchRow | None:
            return max(rows, key=lambda r: r.tokens_per_s) if rows else None

        b_hf, b_ll, b_any = best(assisted), best(lossless), best(ours)

        def ratio(a: BenchRow | None, b: BenchRow | None) -> float | None:
            return a.tokens_per_s / b.tokens_per_s if a is not None and b is not None else None

        return {
            "sd_3stage_speedup": sd.speedup if sd is not None else None,
            "best_hf_assisted": b_hf.label if b_hf else None,
            "best_lossless_pipeline": b_ll.label if b_ll else None,
            "best_lossless_over_hf_assisted": ratio(b_ll, b_hf),
            "best_pipeline": b_any.label if b_any else None,
            "best_over_hf_assisted": ratio(b_any, b_hf),
            "max_overhead_fraction": max((r.overhead_fraction for r in ours), default=None),
            "best_lossless_overhead_fraction": b_ll.overhead_fraction if b_ll else None,
        }

    def goals_markdown(self) -> str:
        g = self.goals()

        def fmt(x: float | None, goal: str, ok: bool | None) -> str:
            if x is None:
                return "not measured"
            return f"{x:.2f}× ({goal}: {'met' if ok else 'NOT met'})"

        sd, ll, anyr, oh = (g["sd_3stage_speedup"], g["best_lossless_over_hf_assisted"], g["best_over_hf_assisted"],
                            g["max_overhead_fraction"])
        lines = [
            "Goals (ratios from this run):",
            f"- sd 3-stage over the target alone: {fmt(sd, 'goal ≥ 2.0', sd is not None and sd >= 2.0)}",
            f"- best lossless pipeline ({g['best_lossless_pipeline']}) over the best HF assisted "
            f"({g['best_hf_assisted']}): {fmt(ll, 'goal ≥ 1.25', ll is not None and ll >= 1.25)}",
            f"- best pipeline of any kind ({g['best_pipeline']}): {fmt(anyr, 'goal ≥ 1.25', anyr is not None and anyr >= 1.25)}",
        ]
        if oh is not None:
            lines.append(f"- framework overhead, worst pyramid row: {100 * oh:.1f}% (goal ≤ 5%: "
                         f"{'met' if oh <= 0.05 else 'NOT met'}); best lossless row: "
                         f"{100 * (g['best_lossless_overhead_fraction'] or 0):.1f}%")
        return "\n".join(lines) + "\n"

    def to_markdown(self) -> str:
        def num(x: float | None, fmt: str) -> str:
            return "-" if x is None or not math.isfinite(x) else format(x, fmt)

        head = ("| config | tok/s | speedup | predicted | tok/target fwd | acceptance | alpha | "
                "ms/forward per stage | overhead | identical |")
        lines = [head, "|" + "---|" * 10]
        for r in self.rows:
            stage_ms = " / ".join(
                f"{s['name']} {num(s['ms_per_forward'], '.1f')}" if s["forwards"] else f"{s['name']} -"
                for s in r.stages
            ) or "-"
            ident = "-" if r.identical is None else ("yes" if r.identical else "**NO**")
            if r.identical is False and not r.lossless:
                ident = "no (lossy)"
            lines.append(
                f"| {r.label} | {num(r.tokens_per_s, '.1f')} | {num(r.speedup, '.2f')}x | "
                f"{num(r.predicted_speedup, '.2f') + ('x' if r.predicted_speedup is not None else '')} | "
                f"{num(r.tokens_per_target_forward, '.2f')} | "
                f"{' / '.join(num(a, '.2f') for a in r.acceptance) or '-'} | "
                f"{' / '.join(num(a, '.2f') for a in r.alpha) or '-'} | {stage_ms} | "
                f"{num(100 * r.overhead_fraction, '.0f') + ('%' if math.isfinite(r.overhead_fraction) else '')} | "
                f"{ident} |"
            )
        notes = [f"- {r.label}: {r.note}" for r in self.rows if r.note]
        m = self.meta
        lines += [
            "",
            f"{m['prompts']} prompts, greedy, up to {m['max_new_tokens']} new tokens each; {m['device']}. "
            f"speedup: tokens/s over {HF_BASELINE!r}; predicted: T_target(1) / tau from the latency model "
            "(alpha per boundary from this run, T(M) per stage timed in this run at each number M of tokens "
            "a forward feeds; forward time only, no framework overhead, no prefill); "
            "acceptance: accepted/proposed per boundary; alpha: per-token acceptance (i.i.d. fit).",
        ]
        if notes:
            lines += ["", *notes]
        lines += ["", self.goals_markdown().rstrip()]
        if self.mismatches:
            lines += ["", "**GREEDY OUTPUT MISMATCH** (lossless rows differing from the target): "
                      + "; ".join(self.mismatches)]
        return "\n".join(lines) + "\n"


def default_configs(
    target: Stage,
    draft: Stage,
    *,
    qualifier: Stage | None = None,
    ngram: str = "ngram",
    tree: str = "tree:budget=8,branching=4",
    lengths2: Sequence[int] | None = None,
    lengths3: Sequence[int] | None = None,
    qualifier_length: int | None = None,
) -> list[BenchConfig]:
    """The pyramid rows: target alone, ngram -> target, 2-stage exact with each draft, then with a
    qualifier the 3-stage ``sd`` chain, ``psd-a`` and ``psd-f`` (lossy: PyramidSD's policies at
    the ``sd`` row's block lengths) and token trees at the bottom of the 2- and 3-stage chains;
    without one, ngram -> draft -> target and a tree draft -> target."""
    from pyramid_core.build import resolve_preset

    ell2 = tuple(lengths2) if lengths2 else (4,)
    ell3 = tuple(lengths3) if lengths3 else (4, 8)
    rows = [
        BenchConfig("pyramid target (N=1)", (target,)),
        BenchConfig("ngram→target", (ngram, target), ("exact",), ell2),
        BenchConfig("draft→target", (draft, target), ("exact",), ell2),
    ]
    if qualifier is None:
        return rows + [
            BenchConfig("ngram→draft→target", (ngram, draft, target), ("exact", "exact"), ell3),
            BenchConfig("tree draft→target", (draft, target), ("exact",), ell2, tree=tree),
        ]
    rows.append(BenchConfig("qualifier→target", (qualifier, target), ("exact",), (qualifier_length or ell3[1],)))
    rows.append(BenchConfig("sd: draft→qualifier→target", (draft, qualifier, target), ("exact", "exact"), ell3))
    for name in ("psd-a", "psd-f"):
        preset = resolve_preset(name, 3)
        rows.append(BenchConfig(f"{name}: draft→qualifier→target", (draft, qualifier, target),
                                tuple(preset.policies), ell3, lossless=False))
    rows.append(BenchConfig("tree draft→target", (draft, target), ("exact",), ell2, tree=tree))
    rows.append(BenchConfig("tree draft→qualifier→target", (draft, qualifier, target), ("exact", "exact"), ell3, tree=tree))
    return rows


def _ids_tensor(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long, device=device)


class _ForwardCounter:
    """Counts forwards of one module (a pre-hook; layer-truncated views of the same model share
    hook dicts, so the module is checked by identity)."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.count = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        if module is self.module:
            self.count += 1

    def remove(self) -> None:
        self._handle.remove()


def _assistant(model: Any, tokens: int) -> Any:
    """A shallow copy of ``model`` with its own generation config: HF tunes it in place. Drafts
    ``tokens`` tokens per round, constant (HF's default schedule starts at 20 and adapts)."""
    assistant = copy.copy(model)
    assistant.generation_config = copy.deepcopy(model.generation_config)
    assistant.generation_config.num_assistant_tokens = tokens
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    return assistant


def _hf_rows(
    target: Any,
    assistants: Sequence[tuple[str, Any, int]],
    encoded: list[list[int]],
    prompt_ids: list[str],
    max_new_tokens: int,
    stop_ids: list[int],
    prompt_lookup_tokens: int,
    progress: bool,
) -> tuple[list[BenchRow], list[list[int]] | None]:
    """HF generate alone, assisted generation with each (name, model, tokens per round) of
    ``assistants``, prompt lookup; and the target's greedy outputs (None when HF generate itself
    failed)."""
    from tqdm import tqdm

    model = target.model
    device = target.device
    base_kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False,
                               "pad_token_id": stop_ids[0] if stop_ids else 0}
    if stop_ids:
        base_kw["eos_token_id"] = list(stop_ids)
    variants: list[tuple[str, dict[str, Any]]] = [(HF_BASELINE, {})]
    for name, assistant_model, tokens in assistants:
        variants.append((f"HF assisted ({name}, {tokens})", {"assistant_model": _assistant(assistant_model, tokens)}))
    variants.append((f"HF prompt lookup ({prompt_lookup_tokens})", {"prompt_lookup_num_tokens": prompt_lookup_tokens}))
    rows: list[BenchRow] = []
    refs: list[list[int]] | None = None
    for label, extra in tqdm(variants, desc="bench HF", disable=not progress):
        row = BenchRow(label, "hf")
        counter = _ForwardCounter(model)
        outs: list[list[int]] = []
        try:
            with torch.inference_mode():
                x = _ids_tensor(encoded[0], device)
                model.generate(x, attention_mask=torch.ones_like(x), **{**base_kw, "max_new_tokens": 2}, **extra)
                counter.count = 0
                for ids in encoded:
                    x = _ids_tensor(ids, device)
                    t0 = time.perf_counter()
                    out = model.generate(x, attention_mask=torch.ones_like(x), **base_kw, **extra)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    row.wall_s += time.perf_counter() - t0
                    outs.append([int(t) for t in out[0, len(ids):].tolist()])
        except Exception as exc:  # an unsupported mode of this transformers version: note it
            row.note = f"not run: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            rows.append(row)
            continue
        finally:
            counter.remove()
        row.tokens = sum(len(o) for o in outs)
        row.target_forwards = counter.count
        if label == HF_BASELINE:
            refs = outs
        elif refs is not None:
            bad = [pid for pid, o, r in zip(prompt_ids, outs, refs) if o != r]
            row.identical, row.mismatched_prompts = not bad, bad
        rows.append(row)
    if refs is not None:
        rows[0].identical = True
    return rows, refs


@attrs.define
class _ForwardCosts:
    """T(M) per model stage, timed once per run (module docstring) and shared by the rows."""

    context_len: int
    repeats: int = 5
    measured: dict[int, tuple[Stage, ForwardCost]] = attrs.field(factory=dict)  # id -> (kept alive, T)

    def __call__(self, stage: Stage, max_m: int) -> ForwardCost:
        """T(M) of ``stage`` measured at least at M = 1 .. ``max_m`` (timed now if not yet)."""
        got = self.measured.get(id(stage))
        if got is None or got[1].points[-1][0] < max_m:
            got = (stage, measure_stage_costs(stage, self.context_len, range(1, max_m + 1), self.repeats))
            self.measured[id(stage)] = got
        return got[1]

    def as_dict(self) -> dict[str, list[list[float]]]:
        """``{stage name: [[M, seconds], ...]}`` for the JSON report."""
        return {cost.name: cost.as_list() for _, cost in self.measured.values()}


def _pyramid_row(
    cfg: BenchConfig,
    pipe: Pipeline,
    encoded: list[list[int]],
    prompt_ids: list[str],
    refs: list[list[int]] | None,
    max_new_tokens: int,
    costs: _ForwardCosts,
) -> BenchRow:
    pipe.generate(encoded[0], min(2, max_new_tokens))  # warm-up (first-call allocations)
    runs: list[Metrics] = []
    bad: list[str] = []
    for i, ids in enumerate(encoded):
        gen = pipe.generate(ids, max_new_tokens, seed=i)
        runs.append(gen.metrics)
        if refs is not None and gen.token_list != refs[i]:
            bad.append(prompt_ids[i])
    row = BenchRow(cfg.label, "pyramid", lossless=cfg.lossless, block_lengths=list(pipe.block_lengths))
    row.tokens = sum(m.new_tokens for m in runs)
    row.wall_s = sum(m.wall_s for m in runs)
    row.target_forwards = sum(m.target_forwards for m in runs)
    n_b = len(pipe.stages) - 1
    proposed = [sum(m.boundaries[k].proposed for m in runs) for k in range(n_b)]
    accepted = [sum(m.boundaries[k].accepted for m in runs) for k in range(n_b)]
    row.acceptance = [a / p if p else math.nan for a, p in zip(accepted, proposed)]
    alphas = measure_alpha(runs) if n_b else []
    row.alpha = alphas
    times = measure_forward_time(runs)
    for k, st in enumerate(runs[0].stages):
        fw = sum(m.stages[k].forwards for m in runs)
        sec = sum(m.stages[k].forward_s for m in runs)
        row.stages.append({"name": st.name, "forwards": fw, "forward_s": sec,
                           "ms_per_forward": 1000 * sec / fw if fw else math.nan})
    forward_s = sum(s["forward_s"] for s in row.stages)
    row.overhead_fraction = (row.wall_s - forward_s) / row.wall_s if row.wall_s > 0 else math.nan
    if refs is not None:
        row.identical, row.mismatched_prompts = not bad, bad
    if cfg.tree is not None:
        row.note = "token tree: the chain latency model does not apply (no prediction)"
    elif all(math.isfinite(a) for a in alphas) and row.tokens:
        per_prompt = max(1, round(row.tokens / len(encoded)))
        # a verification feeds at most ell + 2 tokens, stage 1's first draft step at most N
        max_m = max([len(pipe.stages), *(ell + 2 for ell in pipe.block_lengths)])
        stage_costs: list[float | ForwardCost] = [
            costs(s, max_m) if isinstance(s, Stage) else t for s, t in zip(pipe.stages, times)]
        pred = predict_chain(alphas, list(pipe.block_lengths), stage_costs, new_tokens=per_prompt)
        row.predicted_speedup = pred.speedup
        row.predicted_tokens_per_target_forward = pred.tokens_per_target_forward
    if n_b and runs[0].stages[0].forwards == 0:
        row.note = (row.note + "; " if row.note else "") + "model-free first stage: its time counts as overhead (T_1 = 0)"
    return row


def run_bench(
    target: Stage,
    draft: Stage,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 64,
    ngram: str = "ngram",
    tree: str = "tree:budget=8,branching=4",
    lengths2: Sequence[int] | None = None,
    lengths3: Sequence[int] | None = None,
    prompt_lookup_tokens: int = 10,
    qualifier: Stage | None = None,
    qualifier_length: int | None = None,
    configs: Sequence[BenchConfig] | None = None,
    extra: Sequence[BenchConfig] = (),
    chat: bool = True,
    hf: bool = True,
    progress: bool = True,
) -> BenchResult:
    """Benchmark greedy decoding of ``prompts`` with HF and pyramid configurations (module
    docstring). ``target`` and ``draft`` are loaded model stages (``HFStage`` for the HF rows);
    ``configs`` replaces the default pyramid rows, ``extra`` adds rows after them."""
    from tqdm import tqdm

    tok = getattr(target, "tokenizer", None)
    if tok is None:
        raise ValueError("bench needs a target stage with a tokenizer (to encode the prompts)")
    encoded = [encode_prompt(tok, p.text, chat) for p in prompts]
    prompt_ids = [p.id for p in prompts]
    greedy = SamplingConfig.greedy()
    base = build_pipeline([target], sampling=greedy)
    stop_ids = list(base.stop_ids)
    rows: list[BenchRow] = []
    refs: list[list[int]] | None = None
    target_model = getattr(target, "model", None)
    if hf and target_model is not None:
        # each assistant drafts as many tokens per round as our 2-stage row with the same draft
        assistants: list[tuple[str, Any, int]] = []
        draft_model, qualifier_model = getattr(draft, "model", None), getattr(qualifier, "model", None)
        if draft_model is not None:
            assistants.append(("draft", draft_model, lengths2[0] if lengths2 else 4))
        if qualifier_model is not None:
            assistants.append(("qualifier", qualifier_model, qualifier_length or (lengths3[1] if lengths3 else 8)))
        hf_rows, refs = _hf_rows(target, assistants, encoded, prompt_ids, max_new_tokens,
                                 stop_ids, prompt_lookup_tokens, progress)
        rows += hf_rows
    if refs is None:  # no HF baseline: the reference is the target alone through pyramid
        refs = [base.generate(ids, max_new_tokens).token_list for ids in encoded]
    todo = list(configs) if configs is not None else default_configs(
        target, draft, qualifier=qualifier, ngram=ngram, tree=tree, lengths2=lengths2, lengths3=lengths3,
        qualifier_length=qualifier_length)
    todo += list(extra)
    mean_prompt = sum(len(ids) for ids in encoded) / max(1, len(encoded))
    costs = _ForwardCosts(max(1, round(mean_prompt + max_new_tokens / 2)))
    for cfg in tqdm(todo, desc="bench pyramid", disable=not progress):
        try:
            pipe = build_pipeline(list(cfg.stages), list(cfg.policies) if cfg.policies else None,
                                  list(cfg.block_lengths) if cfg.block_lengths else None,
                                  sampling=greedy, stop_ids=stop_ids, tree=cfg.tree)
        except Exception as exc:
            rows.append(BenchRow(cfg.label, "pyramid", lossless=cfg.lossless,
                                 note=f"not run: {type(exc).__name__}: {exc}"[:200]))
            continue
        rows.append(_pyramid_row(cfg, pipe, encoded, prompt_ids, refs, max_new_tokens, costs))
    hf_base = next((r for r in rows if r.label == HF_BASELINE and r.tokens), None)
    ref_tps = hf_base.tokens_per_s if hf_base is not None else rows[len(rows) - len(todo)].tokens_per_s
    for r in rows:
        r.speedup = r.tokens_per_s / ref_tps if r.tokens and ref_tps > 0 else math.nan
    import transformers

    meta = {
        "prompts": len(prompts),
        "prompt_ids": prompt_ids,
        "max_new_tokens": max_new_tokens,
        "target": getattr(target, "name", "target"),
        "draft": getattr(draft, "name", "draft"),
        "qualifier": getattr(qualifier, "name", None) if qualifier is not None else None,
        "device": f"{getattr(target, 'device', 'cpu')}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
                  f"transformers {transformers.__version__}, {platform.processor() or platform.machine()}",
        "baseline": HF_BASELINE if hf_base is not None else rows[len(rows) - len(todo)].label,
        "forward_costs": costs.as_dict(),
        "time": time.time(),
    }
    return BenchResult(rows, meta)


def write_bench(result: BenchResult, out_dir: str | Path) -> list[Path]:
    """bench.json, bench.md and (with matplotlib) bench.png in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bench.json", out / "bench.md"]
    written[0].write_text(json.dumps(result.as_dict(), indent=2, default=str))
    written[1].write_text(result.to_markdown())
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
