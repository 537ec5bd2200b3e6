"""Test matrix: `nox -s tests`, `nox -s typecheck`, `nox -s lint`, and `nox -s stress` (the
property-based suite with ten times the examples; `nox -l` lists them)."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "typecheck", "lint"]
nox.options.reuse_existing_virtualenvs = True

PYTHONS = ["3.10", "3.11", "3.12"]
# torch 2.13.0 is the release CI installs; users with CUDA install their own build first.
TORCH = "torch==2.13.0"


@nox.session(python=PYTHONS)
@nox.parametrize("suite", ["fast", "slow"])
def tests(session: nox.Session, suite: str) -> None:
    """The pytest suite; `slow` needs the real SmolLM2 model (fetched by `pyramid setup`)."""
    session.install(TORCH, "-e", ".[dev]")
    if suite == "slow":
        session.run("pyramid", "setup", "--quiet")
        session.run("pytest", "-q", "-m", "slow", *session.posargs)
    else:
        session.run("pytest", "-q", "-m", "not slow", *session.posargs)


@nox.session(python="3.11")
def stress(session: nox.Session) -> None:
    """tests/test_properties.py under the hypothesis profile "stress" (random, 10x the examples of
    the CI profile the test sessions use; several minutes on a 2-core CPU)."""
    session.install(TORCH, "-e", ".[dev]")
    session.run("pytest", "-q", "tests/test_properties.py", "--hypothesis-show-statistics", *session.posargs,
                env={"PYRAMID_HYPOTHESIS_PROFILE": "stress"})


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict on pyramid_core and pyramid_plugins."""
    session.install(TORCH, "-e", ".[dev]")
    session.run("mypy")


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff on the whole tree."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
