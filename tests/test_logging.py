"""The library logs, the command line decides what is shown.

- no ``print`` in ``pyramid_core`` or ``pyramid_plugins`` outside ``pyramid_core/cli/`` (the
  source is parsed, every call of the name ``print`` is one);
- library messages go through ``logging`` under ``pyramid_core`` (a ``caplog`` sees them) and
  the library adds no handler but a ``NullHandler``;
- every command, a plugin's and ``distill``'s included, takes ``-v`` / ``-q``: by default a
  note shows on stderr, ``-q`` leaves stderr empty for a successful command (no notes, no
  progress bars), ``-v`` shows DEBUG; results stay on stdout either way.
"""

from __future__ import annotations

import argparse
import ast
import logging
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from pyramid_core import plugins
from pyramid_core.cli import build_parser, main
from pyramid_core.cli.common import show_progress
from pyramid_core.hookspecs import hookimpl
from pyramid_core.plugins import registries_with

ROOT = Path(__file__).resolve().parent.parent
D2 = ["check", "--dist", "0.5,0.3,0.2", "--dist", "0.2,0.3,0.5", "--samples", "2000"]


def print_calls(root: Path) -> list[str]:
    """``file:line`` of every ``print(...)`` call in the library's Python files outside cli/."""
    found = []
    for package in ("pyramid_core", "pyramid_plugins"):
        for path in sorted((root / package).rglob("*.py")):
            if "cli" in path.relative_to(root / package).parts[:1]:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            found += [f"{path.relative_to(root)}:{node.lineno}" for node in ast.walk(tree)
                      if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    return found


def test_the_library_does_not_print() -> None:
    assert print_calls(ROOT) == [], "log through logging.getLogger(__name__) instead"


def test_the_print_check_catches_a_print(tmp_path: Path) -> None:
    """Negative control: a print in a library module is found, one under cli/ is not."""
    (tmp_path / "pyramid_core" / "cli").mkdir(parents=True)
    (tmp_path / "pyramid_plugins").mkdir()
    (tmp_path / "pyramid_core" / "mod.py").write_text("def f():\n    print('hi', file=None)\n")
    (tmp_path / "pyramid_core" / "cli" / "cmd.py").write_text("print('a result')\n")
    assert print_calls(tmp_path) == ["pyramid_core/mod.py:2"]


def test_the_library_adds_only_a_null_handler() -> None:
    import pyramid_plugins  # noqa: F401 (its __init__ adds the handler)

    for name in ("pyramid_core", "pyramid_plugins"):
        handlers = logging.getLogger(name).handlers
        assert handlers and all(isinstance(h, logging.NullHandler) for h in handlers), (name, handlers)


def test_a_library_message_goes_to_logging(caplog: pytest.LogCaptureFixture) -> None:
    from pyramid_core.backends.hf import smollm2

    caplog.set_level(logging.DEBUG, logger="pyramid_core")
    registries_with()  # the plugins say what they register, at DEBUG
    smollm2._say(True, "converting again")  # a setup step, at INFO
    by_name = {(r.name, r.levelno) for r in caplog.records}
    assert ("pyramid_core.plugins", logging.DEBUG) in by_name
    assert ("pyramid_core.backends.hf.smollm2", logging.INFO) in by_name
    assert any("plugin exact" in r.getMessage() for r in caplog.records)


def noisy_plugin() -> types.ModuleType:
    """A plugin command that logs a note and a debug line, shows a progress bar unless quiet, and
    prints its result."""

    def configure(parser: argparse.ArgumentParser) -> Any:
        def run(ns: argparse.Namespace) -> int:
            from tqdm import tqdm

            log = logging.getLogger("pyramid_core.lab.noisy")
            log.info("measuring modes...")
            log.debug("a detail")
            for _ in tqdm(range(3), desc="noisy", disable=not show_progress(ns)):
                pass
            print("the result")
            return 0

        return run

    def register_commands(register: Any) -> None:
        register("noisy", configure, "log, show progress and print a result")

    mod = types.ModuleType("noisy_plugin")
    mod.register_commands = hookimpl(register_commands)  # type: ignore[attr-defined]
    return mod


@pytest.fixture
def noisy(monkeypatch: pytest.MonkeyPatch) -> None:
    regs = registries_with(noisy_plugin())
    monkeypatch.setattr(plugins, "registries", lambda: regs)


@pytest.mark.usefixtures("noisy")
def test_notes_and_progress_on_stderr_results_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["noisy"]) == 0
    out, err = capsys.readouterr()
    assert out == "the result\n"
    assert "pyramid noisy: measuring modes..." in err and "noisy" in err.replace("pyramid noisy", "")
    assert "a detail" not in err


@pytest.mark.usefixtures("noisy")
@pytest.mark.parametrize("flag", ["-q", "--quiet"])
def test_quiet_leaves_stderr_empty(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["noisy", flag]) == 0
    assert capsys.readouterr() == ("the result\n", "")


@pytest.mark.usefixtures("noisy")
@pytest.mark.parametrize("argv", [["noisy", "-v"], ["noisy", "--verbose"], ["-v", "noisy"]])
def test_verbose_shows_debug(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out == "the result\n"
    assert "pyramid noisy: debug: pyramid_core.lab.noisy: a detail" in err
    assert "pyramid noisy: measuring modes..." in err


def test_main_leaves_no_handler_behind() -> None:
    before = {name: list(logging.getLogger(name).handlers) for name in ("pyramid_core", "pyramid_plugins")}
    assert main(["plugins", "-v"]) == 0
    assert {name: list(logging.getLogger(name).handlers) for name in before} == before


@pytest.mark.parametrize("argv", [
    [*D2, "-q"],
    ["plugins", "--quiet"],
    ["plugins", "--json", "-q"],
])
def test_quiet_builtin_commands_write_nothing_on_stderr(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out and err == ""


def test_quiet_in_a_real_process() -> None:
    """``pyramid plugins -q`` as a process: a result on stdout, nothing on stderr."""
    proc = subprocess.run([sys.executable, "-m", "pyramid_core.cli", "plugins", "-q"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "exact" in proc.stdout
    assert proc.stderr == ""


def every_parser(parser: argparse.ArgumentParser, name: str = "pyramid") -> dict[str, argparse.ArgumentParser]:
    out = {name: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                out.update(every_parser(sub, f"{name} {sub_name}"))
    return out


def test_every_command_takes_verbose_and_quiet() -> None:
    parsers = every_parser(build_parser())
    assert {"pyramid setup", "pyramid bench", "pyramid distill eval", "pyramid distill all"} <= set(parsers)
    for name, p in parsers.items():
        assert {"-v", "--verbose", "-q", "--quiet"} <= set(p._option_string_actions), name


@pytest.mark.parametrize("argv", [
    ["setup", "--quiet"],  # as .ci/run and noxfile.py spell it
    ["distill", "eval", "--quiet"],
    ["distill", "-q", "train", "--role", "draft"],
    ["distill", "corpus", "-qq"],
])
def test_quiet_is_read_wherever_it_is_given(argv: list[str]) -> None:
    from pyramid_core.cli import parse_args

    ns = parse_args(argv)
    assert ns.quiet >= 1 and not show_progress(ns)
