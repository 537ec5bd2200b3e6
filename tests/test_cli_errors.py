"""The CLI error contract: every user mistake, for every command, exits with status 2 and exactly
one line on stderr, ``pyramid CMD: error: ...``, saying what is wrong (and, where there is a
choice, what would be valid) -- never a traceback. One table of misuses, run in-process through
``pyramid_core.cli.main``; two of them also through a real ``pyramid`` process."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from pyramid_core import PluginError
from pyramid_core.cli import main
from pyramid_core.hookspecs import hookimpl
from pyramid_plugins.exact import ExactPolicy

D2 = ["--dist", "0.5,0.3,0.2", "--dist", "0.2,0.3,0.5"]
D3 = [*D2, "--dist", "0.3,0.3,0.4"]
NO_CUDA = not torch.backends.cuda.is_built()  # a CPU build of torch (a CUDA build without a GPU says something else)


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny saved model (``hf:path=``), a plain file, a folder, and places nobody can write."""
    from pyramid_core.backends.hf.tiny import save_with_words, tiny_llama

    root = tmp_path_factory.mktemp("cli-errors")
    save_with_words(tiny_llama(0), root / "tiny")
    (root / "afile").write_text("not a folder\n")
    (root / "adir").mkdir()
    return {"TINY": f"hf:path={root / 'tiny'}", "FILE": str(root / "afile"), "DIR": str(root / "adir"),
            "UNDER": str(root / "afile" / "sub"), "NOWHERE": "/proc/pyramid-cannot-write-here"}


# (id, argv, the message, as a regular expression searched in the one stderr line)
CASES: list[tuple[str, list[str], str]] = [
    # check
    ("check-negative-temperature", ["check", *D2, "--temperature", "-0.5"],
     r"argument --temperature: must be a finite number >= 0, got -0\.5 \(0 = greedy\)"),
    ("check-top-p-zero", ["check", *D2, "--top-p", "0"], r"argument --top-p: must be in \(0, 1\], got 0\.0"),
    ("check-top-k-negative", ["check", *D2, "--top-k", "-1"], r"argument --top-k: must be >= 0 \(0 = off\), got -1"),
    ("check-tree-with-fuzzy", ["check", *D2, "--tree", "2", "--policy", "fuzzy"],
     r"its policy 'fuzzy' verifies chains only; use a policy that verifies trees there \(exact, traversal\)"),
    ("check-capped-length", ["check", *D3, "--length", "3", "--length", "1"],
     r"block lengths 3,1: the length 3 at boundary 1 -> 2 cannot take effect.*use 1,1 \(what would run\)"),
    ("check-length-zero", ["check", *D2, "--length", "0"], r"argument --length: must be >= 1"),
    ("check-bad-sum", ["check", "--dist", "0.5,0.6", "--dist", "0.5,0.5"], r"probabilities must sum to 1, got 1\.1"),
    ("check-not-numbers", ["check", "--dist", "a,b"], r"is not a comma-separated list of numbers"),
    ("check-no-dist", ["check"], r"give one --dist per stage"),
    ("check-negative-probability", ["check", "--dist", "-0.1,0.6,0.5", "--dist", "0.2,0.3,0.5"],
     r"--dist #1 \(stage 1\): probabilities must be >= 0, got -0\.1 at index 0"),
    ("check-negative-probability-equals", ["check", *D2, "--dist=-0.5,1.5,0"],
     r"--dist #3 \(stage 3\): probabilities must be >= 0, got -0\.5 at index 0"),
    ("check-huge-seed", ["check", *D2, "--seed", "99999999999999999999"],
     r"argument --seed: a seed must be an integer in \[0, 2\*\*63\), got 99999999999999999999 "),
    ("check-negative-seed", ["check", *D2, "--seed", "-1"], r"argument --seed: .* in \[0, 2\*\*63\), got -1 "),
    ("check-float-seed", ["check", *D2, "--seed", "1.5"],
     r"argument --seed: expected an integer seed in \[0, 2\*\*63\), got '1\.5'"),
    ("check-samples-zero", ["check", *D2, "--samples", "0"], r"argument --samples: must be >= 1"),
    ("check-unknown-policy", ["check", *D2, "--policy", "exakt"], r"unknown policy 'exakt'; did you mean 'exact'\?"),
    ("check-preset-and-policy", ["check", *D2, "--preset", "sd", "--policy", "exact"],
     r"give either a preset \('sd'\) or policies, not both"),
    ("check-preset-wrong-size", ["check", *D2, "--preset", "psd-f"], r"preset 'psd-f' is for 3 stages, got 2"),
    # generate
    ("generate-negative-temperature", ["generate", "--prompt", "w1", "--temperature", "-0.5"],
     r"argument --temperature: must be a finite number >= 0"),
    ("generate-huge-seed", ["generate", "--prompt", "w1", "--seed", str(2**70)],
     r"argument --seed: a seed must be an integer in \[0, 2\*\*63\)"),
    ("generate-top-p-zero", ["generate", "--prompt", "w1", "--top-p", "0"], r"argument --top-p: must be in \(0, 1\]"),
    ("generate-unusable-device", ["generate", "--prompt", "w1", "--stage", "TINY", "--device", "cuda:97"],
     r"device 'cuda:97' is not usable here \(.+\); usable: cpu"),
    *([("generate-cuda-on-cpu-torch", ["generate", "--prompt", "w1", "--stage", "TINY", "--device", "cuda"],
        r"device 'cuda' is not usable here \(Torch not compiled with CUDA enabled\); usable: cpu")] if NO_CUDA else []),
    ("generate-tree-with-fuzzy", ["generate", "--prompt", "w1", "--stage", "TINY", "--stage", "TINY",
                                  "--tree", "tree", "--policy", "fuzzy"], r"verifies chains only"),
    ("generate-compare-zero-tokens", ["generate", "--prompt", "w1", "--stage", "TINY", "--max-new-tokens", "0",
                                      "--compare"], r"--compare times HF generate, which needs --max-new-tokens >= 1"),
    ("generate-tree-ngram", ["generate", "--prompt", "w1", "--stage", "TINY", "--stage", "TINY", "--tree", "ngram"],
     r"unknown wrapper 'ngram' \(available: tree\): 'ngram' is a proposer"),
    ("generate-branching-negative", ["generate", "--prompt", "w1", "--no-chat", "--stage", "TINY", "--stage", "TINY",
                                     "--tree", "tree:branching=-1"], r"branching '-1' is not a list of integers >= 1"),
    ("generate-branching-double-dash", ["generate", "--prompt", "w1", "--no-chat", "--stage", "TINY", "--stage",
                                        "TINY", "--tree", "tree:branching=4--2"], r"branching '4--2' is not a list"),
    ("generate-negative-tokens", ["generate", "--prompt", "w1", "--max-new-tokens", "-1"],
     r"argument --max-new-tokens: must be >= 0, got -1"),
    ("generate-capped-length", ["generate", "--prompt", "w1", "--stage", "TINY", "--stage", "TINY", "--stage", "TINY",
                                "--length", "4", "--length", "2"], r"block lengths 4,2: the length 4 at boundary 1 -> 2"),
    ("generate-metrics-is-a-folder", ["generate", "--prompt", "w1", "--stage", "TINY", "--metrics", "DIR"],
     r"--metrics '.*adir' is a folder, but a file is needed here"),
    ("generate-metrics-under-a-file", ["generate", "--prompt", "w1", "--stage", "TINY", "--metrics", "UNDER"],
     r"'.*afile' is a file, so nothing can be created under it"),
    ("generate-unknown-stage", ["generate", "--prompt", "w1", "--stage", "smolm2"],
     r"unknown stage 'smolm2'; did you mean 'smollm2'\?"),
    ("generate-bad-nonfinite", ["generate", "--prompt", "w1", "--nonfinite", "ignore"],
     r"argument --nonfinite: invalid choice: 'ignore' \(choose from '?raise'?, '?warn'?\)"),
    ("generate-context-too-long", ["generate", "--prompt", "w1 w2", "--no-chat", "--stage", "TINY",
                                   "--max-new-tokens", "600"],
     r"the prompt \(2 tokens\) \+ max_new_tokens \(600\) = 602 tokens do not fit stage .*context length is 512"),
    ("generate-proposer-as-target", ["generate", "--prompt", "w1", "--stage", "ngram"],
     r"must be a model stage, not a proposer"),
    # bench
    ("bench-out-is-a-file", ["bench", "--out", "FILE"], r"--out '.*afile' is a file, but a folder is needed here"),
    ("bench-out-under-a-file", ["bench", "--out", "UNDER"], r"is a file, so nothing can be created under it"),
    ("bench-out-unwritable", ["bench", "--out", "NOWHERE"], r"cannot create the folder .*; give a writable place"),
    ("bench-capped-lengths", ["bench", "--out", "DIR", "--lengths-3", "3,1"],
     r"--lengths-3 3,1: block lengths 3,1: the length 3 at boundary 1 -> 2 cannot take effect"),
    ("bench-bad-lengths", ["bench", "--out", "DIR", "--lengths-2", "x"], r"--lengths-2 takes comma-separated integers"),
    ("bench-lookup-a-backend", ["bench", "--out", "DIR", "--lookup", "smollm2"],
     r"--lookup smollm2: lookup='smollm2' names a model backend; the lookup is a model-free proposer"),
    ("generate-lookup-unknown", ["generate", "--prompt", "hi", "--stage", "TINY", "--stage", "TINY", "--lookup", "ngarm"],
     r"unknown proposer 'ngarm'; did you mean 'ngram'"),
    ("bench-unusable-device", ["bench", "--out", "DIR", "--device", "cuda:97"], r"device 'cuda:97' is not usable"),
    ("bench-per-kind-zero", ["bench", "--per-kind", "0"], r"argument --per-kind: must be >= 1"),
    # sweep
    ("sweep-out-is-a-file", ["sweep", "--preset", "fsd", "--out", "FILE"], r"is a file, but a folder is needed"),
    ("sweep-bad-taus", ["sweep", "--preset", "fsd", "--out", "DIR", "--taus", "a,b"],
     r"--taus takes comma-separated numbers"),
    ("sweep-negative-tau", ["sweep", "--preset", "fsd", "--out", "DIR", "--taus", "0.1,-1"],
     r"--taus: a divergence threshold must be a finite number >= 0, got -1\.0"),
    ("sweep-capped-grid", ["sweep", "--preset", "psd-f", "--out", "DIR", "--length-grid", "8,2"],
     r"--length-grid 8,2: block lengths 8,2: the length 8 at boundary 1 -> 2 cannot take effect"),
    ("sweep-unknown-preset", ["sweep", "--preset", "psd-x", "--out", "DIR", "--stage", "TINY", "--stage", "TINY"],
     r"unknown preset 'psd-x'; did you mean"),
    # distill
    ("distill-eval-out-is-a-folder", ["distill", "eval", "--out", "DIR"], r"--out '.*adir' is a folder"),
    ("distill-train-out-is-a-file", ["distill", "train", "--role", "draft", "--workdir", "DIR", "--out", "FILE"],
     r"--out '.*afile' is a file, but a folder is needed"),
    ("distill-workdir-is-a-file", ["distill", "all", "--workdir", "FILE"], r"--workdir '.*afile' is a file"),
    ("distill-unknown-role", ["distill", "train", "--role", "critic"], r"argument --role: invalid choice: 'critic'"),
    ("distill-per-kind-zero", ["distill", "eval", "--per-kind", "0"], r"argument --per-kind: must be >= 1"),
    ("distill-huge-seed", ["distill", "corpus", "--seed", str(2**44)],
     r"argument --seed: a seed must be an integer in \[0, 2\*\*44\), got 17592186044416 "),
    # plan and profile
    ("plan-no-stage", ["plan"], r"give the candidates as --stage NAME\[:k=v,\.\.\.\]"),
    ("plan-proposer-target", ["plan", "--stage", "TINY", "--stage", "ngram"], r"must be a model backend, not a proposer"),
    ("plan-twice", ["plan", "--stage", "TINY", "--stage", "TINY"], r"is given twice; each candidate once"),
    ("plan-max-length-zero", ["plan", "--stage", "TINY", "--max-length", "0"], r"argument --max-length: must be >= 1"),
    ("profile-bad-widths", ["profile", "--stage", "TINY", "--widths", "a,b"], r"--widths takes comma-separated integers"),
    ("profile-decreasing-widths", ["profile", "--stage", "TINY", "--widths", "4,2"],
     r"--widths must be strictly increasing integers >= 1"),
    ("profile-proposer", ["profile", "--stage", "ngram"], r"--stage 'ngram' is a proposer; `profile` times model stages"),
    ("profile-context-too-long", ["profile", "--stage", "TINY", "--context", "600"],
     r"a 600-token context \+ 12 rounds \(2 warm-up, 10 timed\) \+ 15 block tokens \(M = 16\) = 627 tokens do not "
     r"fit stage .*whose context length is 512 tokens; use a context of at most 485 tokens"),
    # the command itself
    ("unknown-command", ["bogus"], r"argument command: invalid choice: 'bogus'"),
]


def _argv(argv: list[str], places: dict[str, str]) -> list[str]:
    return [places.get(a, a) for a in argv]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = int(exc.code or 0)
    return rc, capsys.readouterr().err


def _prefix(argv: list[str]) -> str:
    if argv[0] == "bogus":
        return "pyramid: error: "
    return f"pyramid {' '.join(argv[:2]) if argv[0] == 'distill' else argv[0]}: error: "


@pytest.mark.parametrize(("argv", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_misuse_is_one_line_and_exit_status_2(argv: list[str], message: str, places: dict[str, str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(_argv(argv, places), capsys)
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(_prefix(argv)), err
    assert "Traceback" not in err
    assert re.search(message, lines[0]), (message, lines[0])


def test_ctrl_c_is_one_line_and_exit_status_130(places: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Any command stopped by Ctrl-C (``bench`` and ``sweep`` say more: tests/test_outputs.py)."""
    import pyramid_core.lab.measure as measure

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(measure, "measure_stage_costs", interrupted)
    rc, err = _run(_argv(["profile", "--stage", "TINY"], places), capsys)
    assert (rc, err) == (130, "pyramid profile: interrupted\n")


def _plugin(name: str, **hooks: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(mod, hook, hookimpl(fn))
    return mod


@pytest.mark.parametrize(("hooks", "message"), [
    ({"register_policies": lambda register: register("exact", ExactPolicy)},
     r"policy 'exact' is registered twice: by plugin 'exact' and by plugin 'rival'\. Neither wins: disable the one "
     r"you do not want with PYRAMID_CORE_DISABLE_PLUGINS=exact \(the other keeps the name\) or "
     r"PYRAMID_CORE_DISABLE_PLUGINS=rival"),
    ({"register_policies": lambda register: 1 / 0},
     r"plugin 'rival' failed in register_policies: ZeroDivisionError"),
])
def test_a_broken_or_clashing_plugin_is_one_named_line(hooks: dict[str, Any], message: str,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The plugin messages of main (a duplicate name says neither wins and how to choose)."""
    import pyramid_core.plugins as plugins

    rival = _plugin("rival", **hooks)
    monkeypatch.setattr(plugins, "registries", lambda: plugins.registries_with(rival))
    with pytest.raises(PluginError):
        plugins.registries()
    rc, err = _run(["plugins"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("pyramid: error: ")
    assert re.search(message, err), err


@pytest.mark.parametrize("argv", [["check", *D2, "--temperature", "-0.5"], ["generate", "--prompt", "w1", "--stage",
                                                                           "TINY", "--tree", "ngram"]])
def test_a_real_process_prints_one_line_and_exits_2(argv: list[str], places: dict[str, str]) -> None:
    code = "import sys; from pyramid_core.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *_argv(argv, places)], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parent)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(_prefix(argv)), proc.stderr
    assert "Traceback" not in proc.stderr
