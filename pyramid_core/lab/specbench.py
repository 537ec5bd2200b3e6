"""Spec-Bench compatibility (Xia et al., "Unlocking Efficiency in Large Language Model Inference:
A Comprehensive Survey of Speculative Decoding", hemingkx/Spec-Bench).

Spec-Bench's question file (``data/spec_bench/question.jsonl``: ``question_id``, ``category``,
``turns``; 80 two-turn MT-bench questions in 8 categories and 80 each of translation,
summarization, qa, math_reasoning and rag) is read as it is -- users download it themselves. Each
question is answered turn by turn with the model's own earlier answers in the chat history, as
Spec-Bench's ``evaluation/eval.py`` does, and every method's answers are written in Spec-Bench's
answer-file shape (``choices[0]`` with ``turns``, ``decoding_steps``, ``new_tokens``,
``wall_time``, ``accept_lengths``), which its ``evaluation/speed.py`` reads. ``accept_lengths``
holds, per verification of the target, the tokens it emitted: the accepted ones plus the bonus or
correction (Spec-Bench's "accept length").

The report groups categories as Spec-Bench does (mt_bench, translation, summarization, qa,
math_reasoning, rag, overall): per group and method, the speedup -- the mean over questions of a
method's tokens/s over the same mean for the baseline, ``speed.py``'s definition -- and the mean
accept length.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from pyramid_core.errors import ConfigError
from pyramid_core.lab.outputs import json_text, md_escape

__all__ = ["Question", "Answer", "GROUPS", "MT_BENCH", "is_specbench_file", "load_questions", "answer_questions",
           "mean_tokens_per_s",
           "write_answers", "group_report", "report_markdown", "Generate"]

MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


@attrs.frozen
class Question:
    id: Any
    category: str
    turns: tuple[str, ...]

    @property
    def group(self) -> str:
        return "mt_bench" if self.category in MT_BENCH else self.category


@attrs.define
class Answer:
    """One method's answer to one question, turn by turn (Spec-Bench's ``choices[0]``)."""

    question: Question
    turns: list[str] = attrs.field(factory=list)
    decoding_steps: list[int] = attrs.field(factory=list)
    new_tokens: list[int] = attrs.field(factory=list)
    wall_time: list[float] = attrs.field(factory=list)
    accept_lengths: list[int] = attrs.field(factory=list)

    @property
    def tokens_per_s(self) -> float:
        seconds = sum(self.wall_time)
        return sum(self.new_tokens) / seconds if seconds > 0 else float("nan")


Generate = Callable[[list[int], int], tuple[list[int], float, int, list[int]]]
"""(prompt ids, seed) -> (new token ids, seconds, target forwards, accept length per verification)."""


def is_specbench_file(path: str | Path) -> bool:
    """Whether ``path`` is a JSONL file of Spec-Bench questions (its first record has ``turns``)."""
    p = Path(path)
    if p.suffix != ".jsonl" or not p.is_file():
        return False
    with p.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and "turns" in first and "question_id" in first
    return False


def load_questions(path: str | Path, *, per_group: int | None = None) -> list[Question]:
    """The questions of a Spec-Bench file; ``per_group`` keeps the first N of each group."""
    p = Path(path)
    questions: list[Question] = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            turns = d["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise TypeError("turns must be a non-empty list of strings")
            questions.append(Question(d["question_id"], str(d["category"]), tuple(turns)))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{p}:{lineno}: not a Spec-Bench question ({exc}); expected question_id, category, turns") from None
    if per_group is not None:
        seen: Counter[str] = Counter()
        kept = []
        for q in questions:
            if seen[q.group] < per_group:
                kept.append(q)
                seen[q.group] += 1
        questions = kept
    if not questions:
        raise ConfigError(f"{p} holds no Spec-Bench questions")
    return questions


def answer_questions(
    generate: Generate,
    tokenizer: Any,
    questions: Sequence[Question],
    *,
    max_new_tokens: int,
    context_limit: int | None = None,
    on_too_long: str = "error",
    seed: int = 0,
    progress: bool = False,
    label: str = "",
) -> tuple[list[Answer], list[Any]]:
    """Answer every question turn by turn with ``generate``, the earlier answers in the chat
    history. A turn whose prompt plus ``max_new_tokens`` exceeds ``context_limit`` is an error
    naming the question (``on_too_long="error"``) or skips the question (``"skip"``); returns
    (answers, ids of skipped questions)."""
    from tqdm import tqdm

    if on_too_long not in ("error", "skip"):
        raise ConfigError(f"on_too_long must be 'error' or 'skip', got {on_too_long!r}")
    answers: list[Answer] = []
    skipped: list[Any] = []
    for q in tqdm(questions, desc=f"spec-bench {label}".strip(), disable=not progress):
        answer = Answer(q)
        messages: list[dict[str, str]] = []
        for turn in q.turns:
            messages.append({"role": "user", "content": turn})
            ids = _chat_ids(tokenizer, messages)
            if context_limit is not None and len(ids) + max_new_tokens > context_limit:
                if on_too_long == "error":
                    raise ConfigError(
                        f"Spec-Bench question {q.id!r} ({q.category}): turn {len(answer.turns) + 1} needs "
                        f"{len(ids)} prompt tokens + {max_new_tokens} new ones, beyond the context length "
                        f"{context_limit}; skip such questions with --on-too-long skip")
                skipped.append(q.id)
                break
            tokens, seconds, steps, accepts = generate(ids, seed)
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            messages.append({"role": "assistant", "content": text})
            answer.turns.append(text)
            answer.new_tokens.append(len(tokens))
            answer.wall_time.append(seconds)
            answer.decoding_steps.append(steps)
            answer.accept_lengths.extend(accepts)
        else:
            answers.append(answer)
    return answers, skipped


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids if isinstance(ids, list) else ids["input_ids"])
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return list(tokenizer(text)["input_ids"])


def model_id(target: str, method: str) -> str:
    """A file-name-safe model id, e.g. ``smollm2-135m-draft-target``."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", f"{target}-{method}").strip("-").lower()


def write_answers(path: str | Path, mid: str, answers: Sequence[Answer]) -> Path:
    """A Spec-Bench answer file (one JSON object per question)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for i, a in enumerate(answers):
            record = {
                "question_id": a.question.id, "category": a.question.category, "answer_id": f"{mid}-{i}",
                "model_id": mid,
                "choices": [{"index": 0, "turns": a.turns, "decoding_steps": a.decoding_steps,
                             "new_tokens": a.new_tokens, "wall_time": a.wall_time,
                             "accept_lengths": a.accept_lengths}],
                "tstamp": time.time(),
            }
            fh.write(json_text(record) + "\n")
    return out


def group_report(methods: dict[str, list[Answer]], baseline: str) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {group: {"speedup", "accept_length", "tokens_per_s", "questions"}}}`` for the
    groups and "overall" (speed.py's definitions; module docstring)."""
    if baseline not in methods:
        raise ConfigError(f"baseline {baseline!r} is not among the methods {list(methods)}")

    def pick(answers: list[Answer], group: str) -> list[Answer]:
        return [a for a in answers if group == "overall" or a.question.group == group]

    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, answers in methods.items():
        out[name] = {}
        for group in (*GROUPS, "overall"):
            mine, base = pick(answers, group), pick(methods[baseline], group)
            if not mine or not base:
                continue
            speed, base_speed = mean_tokens_per_s(mine), mean_tokens_per_s(base)
            accepts = [x for a in mine for x in a.accept_lengths]
            out[name][group] = {"speedup": speed / base_speed, "tokens_per_s": speed,
                                "accept_length": statistics.fmean(accepts) if accepts else float("nan"),
                                "questions": float(len(mine))}
    return out


def mean_tokens_per_s(answers: list[Answer]) -> float:
    """What a method's overall speed is in the report: the mean over answers of tokens/s."""
    return statistics.fmean(a.tokens_per_s for a in answers) if answers else 0.0


def report_markdown(report: dict[str, dict[str, dict[str, float]]], baseline: str, gain_over: str | None = None
                    ) -> str:
    """The per-group table; with ``gain_over`` (a method), a last column: each method's overall
    tokens/s over that method's (speculation's own gain, apart from the runtime's)."""
    groups = [g for g in (*GROUPS, "overall") if any(g in r for r in report.values())]
    gain = gain_over is not None and "overall" in report.get(gain_over, {})
    lines = ["| method | " + " | ".join(groups) + (" | gain |" if gain else " |"),
             "|" + "---|" * (len(groups) + 1 + gain)]
    for name, rows in report.items():
        cells = [f"{rows[g]['speedup']:.2f}x / {rows[g]['accept_length']:.2f}" if g in rows else "-" for g in groups]
        if gain:
            assert gain_over is not None
            base = report[gain_over]["overall"]["tokens_per_s"]
            cells.append(f"{rows['overall']['tokens_per_s'] / base:.2f}x"
                         if "overall" in rows and not name.startswith("HF") and base > 0 else "-")
        lines.append(f"| {md_escape(name)} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{g} {int(next(iter(report.values()))[g]['questions'])}" for g in groups
                       if g in next(iter(report.values())))
    lines += ["", f"Each cell: speedup over {md_escape(repr(baseline))} (the fastest HF configuration of the run; mean "
              "over questions of tokens/s, over the baseline's) / mean accept length (tokens per target "
              f"verification, bonus included). Questions: {counts}."
              + (f" gain: overall tokens/s over {md_escape(repr(gain_over))}'s." if gain else "")]
    return "\n".join(lines) + "\n"
