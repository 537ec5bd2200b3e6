"""Results are never lost at the end: output paths are checked before the work starts
(``pyramid_core.lab.outputs``), and bench and sweep append every finished configuration to a
JSON-lines log, so an interrupted run keeps what it measured and a rerun resumes from it."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pyramid_core.lab.bench.run as bench_run
import pyramid_core.lab.sweep as sweep_module
from pyramid_core import ConfigError, PipelineSpec, SamplingConfig
from pyramid_core.backends.hf import HFStage
from pyramid_core.cli import main
from pyramid_core.lab.bench import BenchConfig, run_bench
from pyramid_core.lab.outputs import RecordLog, RunLock, json_text, output_dir, output_file
from pyramid_core.lab.prompts import Prompt
from pyramid_core.lab.sweep import run_sweep

WORDS = ["<unk>"] + [f"w{i}" for i in range(63)]
PROMPTS = [Prompt("p1", "any", "w1 w2 w3 w4 w5 w1 w2 w3"), Prompt("p2", "any", "w10 w11 w12 w10 w11 w40")]


class Interrupted(Exception):
    """Stands for Ctrl-C or a crash in the middle of a run."""


# --- checked before the work starts -------------------------------------------------------------


def test_unusable_output_folders_are_refused(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=r"--out '.*afile' is a file, but a folder is needed here"):
        output_dir(afile)
    with pytest.raises(ConfigError, match=r"--out '.*afile/deeper/out': '.*afile' is a file, so nothing can be "
                                          r"created under it"):
        output_dir(afile / "deeper" / "out")
    with pytest.raises(ConfigError, match=r"--out '/proc/pyramid-x': cannot create the folder '/proc/pyramid-x' "
                                          r"\(.+\); give a writable place"):
        output_dir("/proc/pyramid-x")
    made = output_dir(tmp_path / "new" / "deeper")
    assert made.is_dir() and not list(made.iterdir())  # created, the probe removed


def test_unusable_output_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"--metrics '.*' is a folder, but a file is needed here; give a file "
                                          r"path \(e\.g\. '.*metrics\.json'\)"):
        output_file(tmp_path, "--metrics")
    with pytest.raises(ConfigError, match=r"is a file, so nothing can be created under it"):
        output_file(tmp_path / "afile" / "m.json", "--metrics")
    with pytest.raises(ConfigError, match=r"cannot write in '/proc'"):
        output_file("/proc/m.json", "--metrics")
    assert output_file(tmp_path / "sub" / "m.json", "--metrics").parent.is_dir()
    assert output_file(tmp_path / "afile", "--metrics") == tmp_path / "afile"  # replaced later, fine


# --- the log ---------------------------------------------------------------------------------------


def test_a_log_resumes_with_the_same_arguments_and_keeps_another_runs(tmp_path: Path) -> None:
    path = tmp_path / "run.partial.jsonl"
    log = RecordLog(path, {"a": 1})
    log.append("first", {"value": 1.5})
    log.append("second", {"value": [1, 2]})
    with path.open("a") as fh:  # a write cut short by the interruption
        fh.write('{"key": "third", "val')
    again = RecordLog(path, {"a": 1})
    assert sorted(again.done) == ["first", "second"] and again.get("second") == {"key": "second", "value": [1, 2]}
    assert again.moved_aside is None
    other = RecordLog(path, {"a": 2})
    assert other.done == {} and other.moved_aside is not None
    kept = [json.loads(line) for line in other.moved_aside.read_text().splitlines()]
    assert [r.get("key") for r in kept] == [None, "first", "second"]  # nothing measured is ever overwritten


# --- bench and sweep keep what they measured -------------------------------------------------------


@pytest.fixture(scope="module")
def stages(tiny_models: dict[str, Any]) -> tuple[HFStage, HFStage]:
    from pyramid_core.backends.hf.tiny import word_tokenizer

    tok = word_tokenizer(WORDS)
    return HFStage(tiny_models["target"], tok, name="target"), HFStage(tiny_models["near"], tok, name="near")


def _interrupt_on(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, call: int,
                  error: type[BaseException] = Interrupted) -> list[int]:
    """``module.name`` raises ``error`` on its ``call``-th call; counts every call."""
    real = getattr(module, name)
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == call:
            raise error(f"stopped at call {call}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_an_interrupted_bench_keeps_its_rows_and_resumes(stages: tuple[HFStage, HFStage], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: everything was written at the end (a failure lost the whole run)."""
    target, draft = stages
    cfgs = [BenchConfig("alone", (target,)), BenchConfig("draft→target", (draft, target), ("exact",), (3,)),
            BenchConfig("ngram→target", ("ngram", target), ("exact",), (3,))]
    kwargs: dict[str, Any] = {"max_new_tokens": 8, "chat": False, "configs": cfgs, "hf": False, "progress": False}
    path = tmp_path / "bench.partial.jsonl"
    with monkeypatch.context() as m:
        calls = _interrupt_on(m, bench_run, "_pyramid_row", 3)
        with pytest.raises(Interrupted):
            run_bench(target, draft, PROMPTS, log=RecordLog(path, {"run": 1}), **kwargs)
        assert calls[0] == 3
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r.get("key") for r in kept] == [None, "reference", "pyramid: alone", "pyramid: draft→target"]
    with monkeypatch.context() as m:
        calls = _interrupt_on(m, bench_run, "_pyramid_row", 99)
        result = run_bench(target, draft, PROMPTS, log=RecordLog(path, {"run": 1}), **kwargs)
        assert calls[0] == 1  # only the configuration that had not finished ran again
    assert [r.label for r in result.rows] == ["alone", "draft→target", "ngram→target"]
    assert result.row("draft→target").wall_s == kept[3]["row"]["wall_s"]  # as measured, not re-run
    assert all(r.identical for r in result.rows) and result.meta["baseline"] == "alone"
    assert result.row("draft→target").speedup > 0


def test_an_interrupted_sweep_keeps_its_points_and_resumes(stages: tuple[HFStage, HFStage], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    target, draft = stages
    spec = PipelineSpec((draft, target), preset="fsd", sampling=SamplingConfig(), stop_ids=())
    kwargs: dict[str, Any] = {"max_new_tokens": 6, "chat": False, "progress": False, "length_grid": [[2], [4]]}
    path = tmp_path / "sweep.partial.jsonl"
    with monkeypatch.context() as m:
        _interrupt_on(m, sweep_module, "_measure", 4)
        with pytest.raises(Interrupted):
            run_sweep(spec, [0.2, 0.5], PROMPTS, log=RecordLog(path, {"run": 1}), **kwargs)
    keys = [json.loads(line).get("key") for line in path.read_text().splitlines()]
    assert keys == [None, "refs", "target alone", "fsd tau=0.2 lengths=2", "fsd tau=0.5 lengths=2"]
    with monkeypatch.context() as m:
        calls = _interrupt_on(m, sweep_module, "_measure", 99)
        points = run_sweep(spec, [0.2, 0.5], PROMPTS, log=RecordLog(path, {"run": 1}), **kwargs)
        assert calls[0] == 2  # the two points at length 4
    assert [(p.tau, p.block_lengths) for p in points] == [(None, ()), (0.2, (2,)), (0.5, (2,)), (0.2, (4,)),
                                                          (0.5, (4,))]
    assert all(len(p.acceptance_per_try) == 1 for p in points[1:])


def test_pyramid_bench_resumes_after_an_interruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """End to end: ``pyramid bench`` stopped after two configurations, run again with the same
    arguments, says it resumes, measures only the rest and writes the usual files."""
    from pyramid_core.backends.hf.tiny import save_with_words, tiny_llama

    model = save_with_words(tiny_llama(0), tmp_path / "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3 w1 w2\n")
    spec = f"hf:path={model}"
    argv = ["bench", "--target", spec, "--draft", spec, "--qualifier", "none", "--lengths-2", "2", "--lengths-3",
            "2,3", "--prompts", str(prompts), "--max-new-tokens", "6", "--no-chat", "--no-compile",
            "--out", str(tmp_path / "out")]
    with monkeypatch.context() as m:
        _interrupt_on(m, bench_run, "_pyramid_row", 3)
        with pytest.raises(Interrupted):
            main(argv)
    capsys.readouterr()
    with monkeypatch.context() as m:
        calls = _interrupt_on(m, bench_run, "_pyramid_row", 99)
        assert main(argv) == 0
    err = capsys.readouterr().err
    assert "pyramid bench: resuming: 3 finished piece(s) taken from" in err  # the reference + 2 rows
    # of the 7 pyramid rows, the target alone and ngram→target were done: draft→target, its adaptive
    # variant, ngram+draft→target, ngram→draft→target and the tree were left
    assert calls[0] == 5
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert len([r for r in data["rows"] if r["framework"] == "pyramid"]) == 7
    assert {"bench.json", "bench.md", "bench.partial.jsonl"} <= {p.name for p in (tmp_path / "out").iterdir()}


def _tiny_bench_argv(tmp_path: Path) -> list[str]:
    from pyramid_core.backends.hf.tiny import save_with_words, tiny_llama

    model = save_with_words(tiny_llama(0), tmp_path / "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3 w1 w2\n")
    spec = f"hf:path={model}"
    return ["bench", "--target", spec, "--draft", spec, "--qualifier", "none", "--lengths-2", "2", "--lengths-3",
            "2,3", "--prompts", str(prompts), "--max-new-tokens", "6", "--no-chat", "--no-compile",
            "--out", str(tmp_path / "out")]


def test_ctrl_c_in_pyramid_bench_says_what_was_kept_and_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a KeyboardInterrupt traceback. Now one line: how many configurations the partial
    log keeps and the command that resumes; exit status 130; the folder's lock released."""
    argv = _tiny_bench_argv(tmp_path)
    with monkeypatch.context() as m:
        _interrupt_on(m, bench_run, "_pyramid_row", 3, KeyboardInterrupt)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    log = tmp_path / "out" / "bench.partial.jsonl"  # the last line, after the progress bars
    assert err.splitlines()[-1] == f"pyramid bench: interrupted; {log} keeps 2 finished configuration(s); run the " \
                                   f"same command to resume from there: {shlex.join(['pyramid', *argv])}"
    assert not (tmp_path / "out" / RunLock.NAME).exists()


def test_ctrl_c_in_pyramid_sweep_says_what_was_kept_and_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from pyramid_core.backends.hf.tiny import save_with_words, tiny_llama

    model = save_with_words(tiny_llama(0), tmp_path / "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3 w1 w2\n")
    argv = ["sweep", "--preset", "fsd", "--stage", f"hf:path={model}", "--stage", f"hf:path={model}", "--taus",
            "0.1,0.5", "--prompts", str(prompts), "--max-new-tokens", "4", "--no-chat", "--no-compile",
            "--out", str(tmp_path / "out")]
    with monkeypatch.context() as m:
        _interrupt_on(m, sweep_module, "_measure", 2, KeyboardInterrupt)  # after the target alone
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert re.search(r"pyramid sweep: interrupted; \S+sweep\.partial\.jsonl keeps 1 finished configuration\(s\); "
                     r"run the same command to resume from there: pyramid sweep --preset fsd", err), err
    assert not (tmp_path / "out" / RunLock.NAME).exists()


# --- one run per output folder ------------------------------------------------------------------

HOLD = "import sys, time; from pyramid_core.lab.outputs import RunLock; RunLock(sys.argv[1], 'pyramid bench')" \
       ".acquire(); print('held', flush=True); time.sleep(60)"


def _holder(folder: Path) -> subprocess.Popen[str]:
    """Another process that takes ``folder``'s lock and keeps it (up to a minute)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("command", [["bench"], ["sweep", "--preset", "fsd"]])
def test_a_second_run_on_a_locked_folder_is_refused_naming_the_first(
        command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: both ran, each measuring under the other's load, and both appended to the same
    partial log. Now the second stops before loading anything: one line naming the running
    one (pid, host, start time) and the lock file, exit status 2."""
    holder = _holder(tmp_path)
    try:
        assert main([*command, "--out", str(tmp_path)]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    lock = tmp_path / RunLock.NAME
    assert re.search(rf"^pyramid {command[0]}: error: '{re.escape(str(tmp_path))}' is in use by another run "
                     rf"\(pyramid bench, pid {holder.pid} on host {re.escape(socket.gethostname())}, started "
                     rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d; lock file '{re.escape(str(lock))}'\); wait for it to end, "
                     r"stop it, or give another --out$", err.strip()), err


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path: Path) -> None:
    """A run killed outright (SIGKILL: no clean-up) leaves its lock file; the OS dropped its
    lock, so the next run takes it over and says whose it was."""
    holder = _holder(tmp_path)
    with pytest.raises(ConfigError, match=f"pid {holder.pid} "):
        RunLock(tmp_path, "pyramid sweep").acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / RunLock.NAME).exists()  # left behind
    with RunLock(tmp_path, "pyramid sweep") as lock:
        assert lock.took_over is not None and lock.took_over["pid"] == holder.pid
        assert lock.took_over_text is not None and f"left by pyramid bench (pid {holder.pid} on host " \
            in lock.took_over_text and "which ended without releasing it" in lock.took_over_text
        assert json.loads((tmp_path / RunLock.NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / RunLock.NAME).exists()


def test_the_lock_is_released_at_the_end_and_on_an_error(tmp_path: Path) -> None:
    with RunLock(tmp_path, "pyramid bench") as lock:
        assert lock.took_over is None
        with pytest.raises(ConfigError, match=rf"pid {os.getpid()} on host "):
            RunLock(tmp_path, "pyramid bench").acquire()  # a second lock, even in the same process
    assert not (tmp_path / RunLock.NAME).exists()
    with pytest.raises(Interrupted), RunLock(tmp_path, "pyramid bench"):
        raise Interrupted("a failure mid-run")
    assert not (tmp_path / RunLock.NAME).exists()
    with RunLock(tmp_path, "pyramid bench") as lock:  # free again, nothing to take over
        assert lock.took_over is None
# --- strict JSON: no NaN or Infinity in what the commands write ------------------------------------


def _strict(text: str) -> Any:
    """``json.loads`` that refuses NaN / Infinity / -Infinity, as strict parsers do."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_text_writes_null_for_non_finite_floats() -> None:
    value = {"a": math.nan, "b": [1.5, math.inf, (-math.inf, 2)], "c": {"d": float("nan")}, "e": None, "f": 3}
    assert _strict(json_text(value)) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": None}, "e": None,
                                         "f": 3}
    assert _strict(json_text({"x": object()}, default=lambda _: math.nan)) == {"x": None}
    with pytest.raises(ValueError, match="NaN is not JSON"):
        _strict(json.dumps({"a": math.nan}))  # the parser the tests use does refuse NaN


def test_check_json_is_strict(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a chain run printed "mean_tree_nodes": NaN."""
    assert main(["check", "--dist", "0.5,0.5", "--dist", "0.2,0.8", "--samples", "50", "--json"]) == 0
    out = _strict(capsys.readouterr().out)
    assert out["mean_tree_nodes"] is None and out["samples"] == 50
    assert main(["check", "--dist", "0.5,0.5", "--dist", "0.2,0.8", "--samples", "50", "--json",
                 "--compare", "exact,block"]) == 0
    assert _strict(capsys.readouterr().out)["compare"][0]["mean_tree_nodes"] is None


def test_generate_metrics_are_strict_and_a_tiny_temperature_is_greedy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_models: dict[str, Any]) -> None:
    """Before: --metrics of a chain held "mean_tree_nodes": NaN, and --temperature 1e-40 crashed
    (IndexError in the sampler)."""
    from pyramid_core.backends.hf.tiny import save_with_words

    target = save_with_words(tiny_models["target"], tmp_path / "target")
    draft = save_with_words(tiny_models["far"], tmp_path / "far")
    reports = []
    for temperature in ("1e-40", "0"):
        metrics = tmp_path / f"m{temperature}.json"
        assert main(["generate", "--prompt", "w1 w2 w3", "--no-chat", "--stage", f"hf:path={draft}", "--stage",
                     f"hf:path={target}", "--length", "3", "--max-new-tokens", "6", "--temperature", temperature,
                     "--metrics", str(metrics)]) == 0
        reports.append(_strict(metrics.read_text()))
    capsys.readouterr()
    assert reports[0]["metrics"]["boundaries"][0]["mean_tree_nodes"] is None
    assert reports[0]["tokens"] == reports[1]["tokens"]
