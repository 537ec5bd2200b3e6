"""Spec-Bench compatibility (``pyramid_core.lab.specbench``) on tiny random models and a question file
in Spec-Bench's shape (the real one is downloaded by users, never committed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pyramid_core import ConfigError
from pyramid_core.backends.hf.tiny import save_with_words
from pyramid_core.cli import main
from pyramid_core.lab.specbench import (
    Answer,
    Question,
    answer_questions,
    group_report,
    is_specbench_file,
    load_questions,
    report_markdown,
    write_answers,
)

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["w1 w2 w3", "w4 w5"]},
    {"question_id": 82, "category": "math", "turns": ["w6 w7 w8 w6 w7"]},
    {"question_id": 301, "category": "translation", "turns": ["w9 w10 w11"]},
    {"question_id": 302, "category": "translation", "turns": ["w12 w13"]},
    {"question_id": 401, "category": "rag", "turns": ["w14 " * 40]},
]


@pytest.fixture
def question_file(tmp_path: Path) -> Path:
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def test_questions_are_read_as_spec_bench_writes_them(question_file: Path, tmp_path: Path) -> None:
    assert is_specbench_file(question_file)
    plain = tmp_path / "prompts.jsonl"
    plain.write_text(json.dumps({"id": "a", "kind": "qa", "prompt": "hi"}) + "\n")
    assert not is_specbench_file(plain)
    qs = load_questions(question_file)
    assert [q.group for q in qs] == ["mt_bench", "mt_bench", "translation", "translation", "rag"]
    assert qs[0].turns == ("w1 w2 w3", "w4 w5")
    assert [q.id for q in load_questions(question_file, per_group=1)] == [81, 301, 401]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": "not a list"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: not a Spec-Bench question"):
        load_questions(bad)


class Recorder:
    """A fake method: answers with fixed tokens and records the prompts it saw."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens, self.prompts = tokens, []  # type: list[int], list[list[int]]

    def __call__(self, ids: list[int], seed: int) -> tuple[list[int], float, int, list[int]]:
        self.prompts.append(list(ids))
        return self.tokens, 0.5, 2, [2, 1]


def test_turns_carry_the_models_own_earlier_answer(question_file: Path, tiny_models: dict[str, Any], tmp_path: Path) -> None:
    from pyramid_core.backends.hf.tiny import word_tokenizer

    tok = word_tokenizer([f"w{i}" for i in range(64)])
    method = Recorder([30, 31, 32])
    answers, skipped = answer_questions(method, tok, load_questions(question_file)[:1], max_new_tokens=3)
    assert not skipped and answers[0].turns == ["w30 w31 w32", "w30 w31 w32"]
    first, second = method.prompts
    assert second[: len(first)] == first and tok.encode("w30 w31 w32") == second[len(first):len(first) + 3]
    assert answers[0].new_tokens == [3, 3] and answers[0].decoding_steps == [2, 2]
    assert answers[0].accept_lengths == [2, 1, 2, 1] and answers[0].wall_time == [0.5, 0.5]
    # the context limit: an error naming the question, or a skip
    with pytest.raises(ConfigError, match=r"Spec-Bench question 401 \(rag\): turn 1 needs \d+ prompt tokens \+ 8 new"):
        answer_questions(method, tok, load_questions(question_file), max_new_tokens=8, context_limit=30)
    answers, skipped = answer_questions(method, tok, load_questions(question_file), max_new_tokens=8,
                                        context_limit=30, on_too_long="skip")
    assert skipped == [401] and [a.question.id for a in answers] == [81, 82, 301, 302]
    path = write_answers(tmp_path / "m.jsonl", "tiny-m", answers)
    record = json.loads(path.read_text().splitlines()[0])
    assert set(record) == {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"}
    assert set(record["choices"][0]) == {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}


def test_group_report_follows_speed_py() -> None:
    def answer(qid: int, category: str, tokens: int, seconds: float, accepts: list[int]) -> Answer:
        return Answer(Question(qid, category, ("x",)), ["t"], [1], [tokens], [seconds], accepts)

    base = [answer(1, "qa", 10, 1.0, [1] * 10), answer(2, "rag", 10, 2.0, [1] * 10)]
    fast = [answer(1, "qa", 10, 0.5, [2, 3]), answer(2, "rag", 10, 1.0, [1, 4])]
    report = group_report({"base": base, "fast": fast}, "base")
    assert report["fast"]["qa"]["speedup"] == pytest.approx(2.0)
    assert report["fast"]["overall"]["speedup"] == pytest.approx(((20 + 10) / 2) / ((10 + 5) / 2))
    assert report["fast"]["overall"]["accept_length"] == pytest.approx(2.5)
    assert report["base"]["rag"]["accept_length"] == 1.0
    with pytest.raises(ConfigError, match="baseline 'nope'"):
        group_report({"base": base}, "nope")
    table = report_markdown(report, "base", gain_over="base")
    assert "| overall | gain |" in table and table.splitlines()[3].endswith("| 2.00x |")  # fast: 15 / 7.5 tok/s


def test_the_spec_bench_baseline_is_the_fastest_hf_configuration(question_file: Path, tiny_models: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    target = save_with_words(tiny_models["target"], tmp_path / "target")
    out = tmp_path / "out"
    assert main(["bench", "--prompts", str(question_file), "--target", f"hf:path={target}", "--draft",
                 f"hf:path={target},num_layers=1", "--qualifier", "none", "--max-new-tokens", "6", "--compile",
                 "--dtype", "float32", "--out", str(out)]) == 0
    report = json.loads((out / "specbench.json").read_text())
    hf = {name: rows["overall"]["tokens_per_s"] for name, rows in report["report"].items() if name.startswith("HF")}
    assert set(hf) == {"HF generate (target)", "HF generate (target, compiled stage)"}
    assert report["baseline"] == max(hf, key=lambda k: hf[k])
    assert "| gain |" in (out / "specbench.md").read_text()


def test_bench_on_a_spec_bench_file(question_file: Path, tiny_models: dict[str, Any], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    target = save_with_words(tiny_models["target"], tmp_path / "target")
    draft = save_with_words(tiny_models["near"], tmp_path / "near")
    out = tmp_path / "out"
    args = ["bench", "--prompts", str(question_file), "--target", f"hf:path={target}", "--draft", f"hf:path={draft}",
            "--qualifier", "none", "--lengths-2", "3", "--lengths-3", "2,3", "--max-new-tokens", "8",
            "--no-compile", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| method | mt_bench | translation | rag | overall |" in text
    report = json.loads((out / "specbench.json").read_text())
    assert report["baseline"] == "HF generate (target)" and "draft→target" in report["report"]
    files = sorted((out / "specbench").glob("*.jsonl"))
    assert len(files) == 5  # HF generate + target alone, ngram, draft, tree (no qualifier: no sd row)
    for f in files:
        lines = [json.loads(line) for line in f.read_text().splitlines()]
        assert [r["question_id"] for r in lines] == [q["question_id"] for q in QUESTIONS]
        assert all(len(r["choices"][0]["turns"]) == len(q["turns"]) for r, q in zip(lines, QUESTIONS, strict=True))


def test_spec_bench_answers_with_the_feature_rows(tiny_models: dict[str, Any], tmp_path: Path) -> None:
    """``run_specbench(extra=...)``: the feature-draft rows (an untrained head reading the tiny
    target's features: exact whatever it predicts) answer every question with the target's own
    greedy tokens, get an answer file and a report row of their own; a label twice is refused."""
    import torch

    from pyramid_core.backends.hf.head import FeatureHead, FeatureHeadConfig
    from pyramid_core.backends.hf.head_stage import FeatureStage
    from pyramid_core.backends.hf.stage import HFStage
    from pyramid_core.backends.hf.tiny import word_tokenizer
    from pyramid_core.lab.bench import feature_configs
    from pyramid_core.lab.bench.questions import run_specbench

    tok = word_tokenizer([f"w{i}" for i in range(int(tiny_models["target"].config.vocab_size))])
    target = HFStage(tiny_models["target"], tok, name="target")
    draft = HFStage(tiny_models["near"], tok, name="near")
    torch.manual_seed(0)
    head = FeatureHead(tiny_models["target"], FeatureHeadConfig(layers=(-1,), variant="eagle1"))
    feature = FeatureStage(head, tok, name="feature", features_from="target")
    extra = feature_configs(target, feature, length=3, tree="tree:budget=6,branching=2")
    questions = [Question(q["question_id"], q["category"], tuple(q["turns"])) for q in QUESTIONS[:3]]
    result = run_specbench(target, draft, questions, tmp_path / "answers", max_new_tokens=6, progress=False,
                           extra=extra)
    alone = [a.turns for a in result.answers["pyramid target (N=1)"]]
    for label in ("feature→target", "tree feature→target"):
        assert [a.turns for a in result.answers[label]] == alone, label
        assert result.report[label]["overall"]["accept_length"] >= 1.0
    assert len(result.files) == len(result.answers) and "| tree feature→target |" in result.to_markdown()
    with pytest.raises(ConfigError, match="same label"):
        run_specbench(target, draft, questions[:1], tmp_path / "again", max_new_tokens=2, progress=False,
                      extra=extra[:1] * 2)
