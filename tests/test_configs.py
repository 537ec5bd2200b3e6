"""Configs in, tidy results out.

- ``--config FILE`` (``generate``, ``bench``, ``sweep``, ``plan``): TOML keys are the options
  (``max_new_tokens`` and ``max-new-tokens`` alike), checked by the flag's own type; the command
  line wins, a repeated flag replacing the file's list; an unknown key, a bad value, a missing
  or broken file is one error naming the file and the key, with the valid keys.
- results record their run (command, effective arguments, versions), and a bench result rerun
  from its own JSON (``pyramid bench --config bench.json``) builds the same configurations --
  checked without models from the arguments, and once end to end on tiny models (seconds).
- bench rows as flat tables: bench.csv and bench.jsonl, the same scalar columns in every row.
- the config example of docs/configs.md is parsed as the page says to run it.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest

from pyramid_core.cli import main, parse_args
from pyramid_core.cli.bench import bench_configurations
from pyramid_core.cli.config import run_arguments
from pyramid_core.errors import ConfigError
from pyramid_core.options import ExecutionMode

ROOT = Path(__file__).resolve().parent.parent


def toml(tmp_path: Path, text: str, name: str = "run.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_toml_keys_are_the_options_by_either_spelling(tmp_path: Path) -> None:
    cfg = toml(tmp_path, 'prompt = "hi"\nmax-new-tokens = 5\ntop_p = 0.9\nstage = ["ngram", "smollm2"]\n'
                         'length = 3\ncompile = "eager"\nchat = false\n')
    ns = parse_args(["generate", "--config", cfg])  # --prompt, required, comes from the file
    assert (ns.prompt, ns.max_new_tokens, ns.top_p, ns.stage, ns.length) == ("hi", 5, 0.9, ["ngram", "smollm2"], [3])
    assert ns.compile is ExecutionMode.EAGER and ns.chat is False


def test_the_command_line_wins(tmp_path: Path) -> None:
    cfg = toml(tmp_path, 'prompt = "hi"\nmax_new_tokens = 5\nstage = ["ngram", "smollm2"]\ncompile = "eager"\n')
    ns = parse_args(["generate", f"--config={cfg}", "--max-new-tokens", "7", "--stage", "smollm2", "--compile",
                     "--prompt", "there"])
    assert (ns.prompt, ns.max_new_tokens, ns.stage, ns.compile) == ("there", 7, ["smollm2"], ExecutionMode.FAST)
    ns = parse_args(["generate", "--config", cfg])  # a fresh parser: nothing left from the run before
    assert (ns.max_new_tokens, ns.stage) == (5, ["ngram", "smollm2"])


@pytest.mark.parametrize(("command", "text", "message"), [
    ("generate", "max_new_token = 3\n",
     r"--config '.*run\.toml': unknown key 'max_new_token'; did you mean 'max_new_tokens'\? "
     r"\(valid keys for `pyramid generate`: chat, compare, .*max_new_tokens"),
    ("bench", "max_new_tokens = 0\n", r"max_new_tokens = 0: must be >= 1"),
    ("bench", "chat = 1\n", r"chat takes true or false, got 1"),
    ("sweep", 'preset = ["psd-a"]\ncompile = "sometimes"\n', r"compile = 'sometimes' is not one of .*eager"),
    ("plan", "stage = [", r"--config '.*run\.toml': not valid TOML"),
    ("bench", 'on-too-long = "ignore"\n', r"on-too-long = 'ignore' is not one of error, skip"),
])
def test_a_bad_file_is_one_line_naming_the_key(command: str, text: str, message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--config", toml(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"pyramid {command}: error: --config"), err
    assert re.search(message, err), err


def test_a_missing_file_an_abbreviation_and_a_command_without_configs(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--config", str(tmp_path / "nowhere.toml")]) == 2
    assert "nowhere.toml': no such file" in capsys.readouterr().err
    cfg = toml(tmp_path, "top = 3\n")
    assert main(["plan", "--conf", cfg]) == 2
    assert "write the flag in full" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's refusal
        main(["check", "--config", cfg])
    assert exit_.value.code == 2 and "unrecognized arguments: --config" in capsys.readouterr().err


def test_a_results_file_of_another_command_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"points": [], "run": {"command": "pyramid sweep", "arguments": {"taus": "0.1"}}}))
    assert main(["bench", "--config", str(sweep)]) == 2
    assert "records a `pyramid sweep` run, not `pyramid bench`" in capsys.readouterr().err
    (tmp_path / "plain.json").write_text("{}")
    assert main(["bench", "--config", str(tmp_path / "plain.json")]) == 2
    assert "must be a results file with the run's arguments" in capsys.readouterr().err


BENCH = ["bench", "--target", "hf:path=T", "--draft", "hf:path=D", "--qualifier", "hf:path=Q", "--lengths-2", "2",
         "--lengths-3", "1,3", "--feature", "none", "--max-new-tokens", "4", "--tree", "tree:budget=4,branching=2"]


def test_bench_configurations_are_built_without_loading() -> None:
    rows = bench_configurations(parse_args(BENCH))
    assert rows[0]["label"] == "pyramid target (N=1)" and rows[0]["stages"] == ["hf:path=T"]
    sd = next(r for r in rows if r["label"] == "sd: draft→qualifier→target")
    assert sd["stages"] == ["hf:path=D", "hf:path=Q", "hf:path=T"] and sd["block_lengths"] == [1, 3]
    assert sd["policies"] == ["exact", "exact"]
    tree = next(r for r in rows if r["label"] == "tree draft→target")
    assert tree["tree"] == "tree:budget=4,branching=2" and tree["block_lengths"] == [2]


def test_a_bench_rerun_from_its_json_builds_the_same_configurations(tmp_path: Path) -> None:
    """The arguments bench.json records, read back by ``--config``: the same configurations,
    and the command line still wins over them."""
    ns = parse_args(BENCH)
    original = bench_configurations(ns)
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps({"meta": {"configurations": original,
                                               "run": {"command": "pyramid bench", "arguments": run_arguments(ns)}},
                                      "rows": []}))
    again = parse_args(["bench", "--config", str(bench_json)])
    assert run_arguments(again) == run_arguments(ns)
    assert bench_configurations(again) == original
    changed = bench_configurations(parse_args(["bench", "--config", str(bench_json), "--qualifier", "none"]))
    assert [r["label"] for r in changed] != [r["label"] for r in original]


def _flat_tables(out: Path) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    with (out / "bench.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    lines = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    return table, lines


def test_bench_rows_as_flat_csv_and_json_lines(tmp_path: Path) -> None:
    from pyramid_core.lab.bench import BenchResult, BenchRow, write_bench

    rows = [BenchRow("HF generate (target)", "hf", tokens=8, wall_s=1.0),
            BenchRow("ngram→draft→target", "pyramid", tokens=8, wall_s=0.5, target_forwards=3,
                     acceptance_per_try=[0.5, float("nan")], acceptance_by_position=[[1.0, 0.5], [0.25]],
                     stages=[{"name": "ngram", "forwards": 0, "forward_s": 0.0, "ms_per_forward": float("nan")},
                             {"name": "target", "forwards": 3, "forward_s": 0.3, "ms_per_forward": 100.0}],
                     note="a, \"quoted\"; note")]
    files = write_bench(BenchResult(rows, {"prompts": 1, "max_new_tokens": 8, "device": "cpu", "baseline": "x"}),
                        tmp_path)
    assert {"bench.csv", "bench.jsonl"} <= {f.name for f in files}
    table, lines = _flat_tables(tmp_path)
    assert [r["label"] for r in table] == [r["label"] for r in lines] == [r.label for r in rows]
    keys = set(table[0])
    assert {"label", "tokens_per_s", "speedup", "stage_names", "ms_per_forward"} <= keys
    assert all(set(r) == keys for r in table) and all(set(line) == keys for line in lines)
    assert all(v is None or isinstance(v, (bool, int, float, str)) for line in lines for v in line.values())
    chain = lines[1]
    assert chain["stage_names"] == "ngram;target" and chain["acceptance_per_try"] == "0.5;"
    assert json.loads(chain["acceptance_by_position"]) == [[1.0, 0.5], [0.25]]
    assert chain["note"] == table[1]["note"] == "a, \"quoted\"; note" and chain["tokens_per_s"] == 16.0


def test_bench_end_to_end_on_tiny_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``pyramid bench`` on saved tiny models: bench.json records the run (arguments, versions,
    configurations), its rows are the configurations, and ``--config bench.json`` builds them again."""
    from pyramid_core.backends.hf.tiny import perturbed, save_with_words, tiny_llama

    target = tiny_llama(0)
    save_with_words(target, tmp_path / "target")
    save_with_words(perturbed(target, seed=1, scale=0.05), tmp_path / "draft")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3 w4 w1 w2 w3\n")
    out = tmp_path / "out"
    capsys.readouterr()  # what saving the models wrote
    argv = ["bench", "--target", f"hf:path={tmp_path / 'target'}", "--draft", f"hf:path={tmp_path / 'draft'}",
            "--qualifier", "none", "--lengths-2", "2", "--lengths-3", "1,2", "--feature", "none", "--no-chat",
            "--prompts", str(prompts), "--max-new-tokens", "4", "--no-compile", "--dtype", "float32",
            "--out", str(out), "-q"]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""  # -q: no notes, no progress bars
    data = json.loads((out / "bench.json").read_text())
    run = data["meta"]["run"]
    assert run["command"] == "pyramid bench" and run["arguments"]["max_new_tokens"] == 4
    versions = run["versions"]
    assert {"python", "torch", "transformers", "pyramid-core", "cpu", "gpu", "stages"} <= set(versions)
    assert [s["dtype"] for s in versions["stages"]] == ["float32", "float32"]
    configurations = data["meta"]["configurations"]
    ran = [r["label"] for r in data["rows"] if r["framework"] == "pyramid"]
    assert [c["label"] for c in configurations] == ran
    assert bench_configurations(parse_args(["bench", "--config", str(out / "bench.json")])) == configurations
    table, lines = _flat_tables(out)
    assert [r["label"] for r in table] == [r["label"] for r in lines] == [r["label"] for r in data["rows"]]


def test_generate_metrics_record_the_run_and_rerun_from_it(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from pyramid_core.backends.hf.tiny import perturbed, save_with_words, tiny_llama

    target = tiny_llama(0)
    save_with_words(target, tmp_path / "target")
    save_with_words(perturbed(target, seed=1, scale=0.05), tmp_path / "draft")
    capsys.readouterr()
    metrics = tmp_path / "m.json"
    argv = ["generate", "--prompt", "w1 w2 w3", "--no-chat", "--stage", f"hf:path={tmp_path / 'draft'}", "--stage",
            f"hf:path={tmp_path / 'target'}", "--length", "2", "--max-new-tokens", "4", "--no-compile",
            "--dtype", "float32", "--metrics", str(metrics), "-q"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == "" and "tokens per target forward" in out
    data = json.loads(metrics.read_text())
    assert data["spec"]["block_lengths"] == [2] and data["spec"]["policies"] == ["exact"]
    assert data["spec"]["sampling"]["temperature"] == 0.0
    assert data["run"]["command"] == "pyramid generate" and data["run"]["arguments"]["compile"] == "eager"
    assert [s["dtype"] for s in data["run"]["versions"]["stages"]] == ["float32", "float32"]
    assert run_arguments(parse_args(["generate", "--config", str(metrics)])) == run_arguments(parse_args(argv))


def test_a_sweep_rerun_from_its_json_has_the_same_arguments(tmp_path: Path) -> None:
    from pyramid_core.lab.provenance import run_record
    from pyramid_core.lab.sweep import SweepPoint, write_sweep

    argv = ["sweep", "--preset", "psd-a", "--preset", "fsd", "--taus", "0.1,0.5", "--stage", "ngram", "--stage",
            "smollm2", "--length-grid", "2", "--temperature", "0.7", "--no-chat"]
    ns = parse_args(argv)
    point = SweepPoint("target alone", None, (), (), 4, 1.0, 4.0, 1.0, (), 2.0, 1.0, 1.0)
    write_sweep([point], tmp_path, run=run_record("pyramid sweep", run_arguments(ns)))
    again = parse_args(["sweep", "--config", str(tmp_path / "sweep.json")])
    assert again.preset == ["psd-a", "fsd"] and run_arguments(again) == run_arguments(ns)
    assert parse_args(["sweep", "--config", str(tmp_path / "sweep.json"), "--preset", "sd"]).preset == ["sd"]


def doc_examples() -> list[tuple[str, str]]:
    """(the command line the example shows, its TOML) for every ```toml block of docs/configs.md;
    the block's first line is a comment with the command, e.g. ``# pyramid bench --config bench.toml``."""
    text = (ROOT / "docs" / "configs.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    out = []
    for block in blocks:
        first = block.splitlines()[0]
        assert first.startswith("# pyramid "), first
        out.append((first.removeprefix("# "), block))
    return out


def test_the_docs_have_config_examples() -> None:
    assert {cmd.split()[1] for cmd, _ in doc_examples()} >= {"generate", "bench"}


@pytest.mark.parametrize("command,block", doc_examples())
def test_the_docs_config_example_is_read(command: str, block: str, tmp_path: Path) -> None:
    words = command.split()[1:]  # e.g. ["bench", "--config", "bench.toml", "--quick"]
    name = words[words.index("--config") + 1]
    (tmp_path / name).write_text(block)
    words[words.index("--config") + 1] = str(tmp_path / name)
    ns = parse_args(words)
    recorded = run_arguments(ns)
    for line in block.splitlines():  # every key of the example is an option, read as written
        if "=" in line and not line.lstrip().startswith("#"):
            key = line.split("=", 1)[0].strip().replace("-", "_")
            assert key in recorded or key in {"lengths_2", "lengths_3"}, key
    if ns.command == "bench":
        rows = bench_configurations(ns)
        assert rows and rows[0]["label"] == "pyramid target (N=1)"


def test_a_config_error_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'nope'"):
        parse_args(["sweep", "--config", toml(tmp_path, "nope = 1\n")])


@pytest.mark.slow
def test_the_docs_generate_example_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The generate example of docs/configs.md run as the page shows it, on the real SmolLM2 (the
    command line's --max-new-tokens 16 wins over the file's 64), with --metrics to read back."""
    (command, block), = [(c, b) for c, b in doc_examples() if c.split()[1] == "generate"]
    words = command.split()[1:]
    (tmp_path / "generate.toml").write_text(block)
    words[words.index("--config") + 1] = str(tmp_path / "generate.toml")
    metrics = tmp_path / "metrics.json"
    assert main([*words, "--metrics", str(metrics), "-q"]) == 0
    assert capsys.readouterr().out.strip()  # the generated text
    record = json.loads(metrics.read_text())
    text = json.dumps(record)
    assert '"max_new_tokens": 16' in text and "ngram" in text and "smollm2" in text
    assert 0 < len(record["tokens"]) <= 16
