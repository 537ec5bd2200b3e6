"""``pyramid bench`` on a Spec-Bench question file: every method answers the questions turn by
turn (``pyramid_core.lab.specbench``), and answer files plus a per-group report come out."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from pyramid_core.backends.hf.baseline import HF_GENERATE, HF_GENERATE_COMPILED
from pyramid_core.backends.hf.stage import HFStage
from pyramid_core.build import PipelineSpec
from pyramid_core.errors import ConfigError
from pyramid_core.lab.bench.report import TARGET_ALONE
from pyramid_core.lab.bench.run import BenchConfig, default_configs
from pyramid_core.lab.outputs import md_escape
from pyramid_core.lab.prompts import encode_prompt
from pyramid_core.lab.specbench import (
    answer_questions,
    group_report,
    mean_tokens_per_s,
    model_id,
    report_markdown,
    write_answers,
)
from pyramid_core.pipeline import Pipeline
from pyramid_core.plugins import Registries, registries
from pyramid_core.protocols import Stage, tokenizer_of
from pyramid_core.types import SamplingConfig

__all__ = ["QUESTION_ROWS", "SpecBenchResult", "run_specbench"]


QUESTION_ROWS = (TARGET_ALONE, "ngram→target", "draft→target", "sd: draft→qualifier→target", "tree draft→target")
"""The pyramid rows a Spec-Bench run answers every question with (each costs a full pass)."""


@attrs.frozen
class SpecBenchResult:
    """Per method the answers, the per-group report, the answer files, skipped questions."""

    answers: dict[str, list[Any]]
    report: dict[str, dict[str, dict[str, float]]]
    baseline: str
    files: tuple[Path, ...]
    skipped: tuple[Any, ...]
    gain_over: str | None = None  # the method the "gain" column divides by (pyramid N = 1)

    def to_markdown(self) -> str:
        text = report_markdown(self.report, self.baseline, self.gain_over)
        if self.skipped:
            text += (f"\nSkipped (beyond the context length): {len(self.skipped)} question(s): "
                     f"{md_escape(str(list(self.skipped)))}\n")
        return text


def run_specbench(
    target: Stage,
    draft: Stage,
    questions: Sequence[Any],
    out_dir: str | Path,
    *,
    qualifier: Stage | None = None,
    max_new_tokens: int = 256,
    lengths2: Sequence[int] | None = None,
    lengths3: Sequence[int] | None = None,
    tree: str = "tree:budget=8,branching=4",
    on_too_long: str = "error",
    progress: bool = True,
    regs: Registries | None = None,
    extra: Sequence[BenchConfig] = (),
) -> SpecBenchResult:
    """Answer Spec-Bench ``questions`` (``pyramid_core.lab.specbench``) greedily with HF generate of
    the target -- eager, and over the stage's compiled runner where it has one; the baseline is the
    faster of them in this run -- the ``QUESTION_ROWS`` pipelines and the ``extra`` rows (e.g. the
    feature-draft rows, ``feature_configs``); write one Spec-Bench answer file per method under
    ``out_dir`` and report speedup and accept length per group, and each pipeline's gain over
    pyramid N = 1."""
    regs = regs or registries()
    tok = tokenizer_of(target)
    if tok is None or not isinstance(target, HFStage):
        raise ConfigError("a Spec-Bench run needs a Hugging Face target with a tokenizer")
    greedy = SamplingConfig.greedy()
    base = PipelineSpec((target,), sampling=greedy).resolve(regs)
    stop_ids = list(base.stop_ids)
    limit = getattr(target.model.config, "max_position_embeddings", None)

    def hf_generate(module: Any) -> Any:
        def generate(ids: list[int], seed: int) -> tuple[list[int], float, int, list[int]]:
            x = torch.tensor([ids], dtype=torch.long, device=target.device)
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = module.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                      do_sample=False, pad_token_id=stop_ids[0] if stop_ids else 0,
                                      eos_token_id=stop_ids or None)
                seconds = time.perf_counter() - t0
            tokens = [int(t) for t in out[0, len(ids):].tolist()]
            return tokens, seconds, len(tokens), [1] * len(tokens)
        return generate

    # HF generate eager and over the stage's compiled runner (where it has one): the baseline is
    # whichever answers faster overall in this run
    methods: dict[str, Any] = {HF_GENERATE: hf_generate(target.model)}
    if target.runner is not target.model:
        methods[HF_GENERATE_COMPILED] = hf_generate(target.runner)
    hf_methods = tuple(methods)
    configs = [c for c in default_configs(target, draft, qualifier=qualifier, tree=tree, lengths2=lengths2,
                                          lengths3=lengths3) if c.label in QUESTION_ROWS]
    configs += extra
    if len({c.label for c in configs}) != len(configs):
        raise ConfigError(f"Spec-Bench rows with the same label: {[c.label for c in configs]}")
    for cfg in configs:
        pipe = cfg.spec(greedy, stop_ids).resolve(regs)

        def pyramid_generate(ids: list[int], seed: int, pipe: Pipeline = pipe) -> tuple[list[int], float, int, list[int]]:
            gen = pipe.generate(ids, max_new_tokens, seed=seed)
            m = gen.metrics
            top = m.boundaries[-1] if m.boundaries else None
            accepts = [a + 1 for a, c in enumerate(top.accepted_hist) for _ in range(c)] if top else [1] * m.new_tokens
            return gen.token_list, m.wall_s, m.target_forwards, accepts

        methods[cfg.label] = pyramid_generate
    answers: dict[str, list[Any]] = {}
    skipped: set[Any] = set()
    for name, generate in methods.items():
        generate(encode_prompt(tok, "Hello.", True), 0)  # warm-up
        answers[name], skip = answer_questions(generate, tok, questions, max_new_tokens=max_new_tokens,
                                               context_limit=limit, on_too_long=on_too_long, progress=progress,
                                               label=name)
        skipped |= set(skip)
    baseline = max(hf_methods, key=lambda name: mean_tokens_per_s(answers[name]))
    out = Path(out_dir)
    files = tuple(write_answers(out / f"{model_id(target.name, name)}.jsonl", model_id(target.name, name), a)
                  for name, a in answers.items())
    gain_over = TARGET_ALONE if TARGET_ALONE in answers else None
    return SpecBenchResult(answers, group_report(answers, baseline), baseline, files, tuple(sorted(skipped, key=str)),
                           gain_over)
