"""The tutorial notebooks run top to bottom.

Each notebook is read as plain JSON (nbformat 4; no Jupyter needed) and its code cells are
executed in order in one fresh namespace, from the ``tutorials`` directory as Jupyter would.
Notebooks 01-03 use explicit tables and run in seconds; 04 loads SmolLM2-135M (``slow``; like
``tests/test_smollm2.py`` it sets the model up with ``ensure_smollm2`` if needed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
FAST = ["01_first_pipeline", "02_writing_an_acceptance_policy", "03_pyramidsd_fuzzy_and_assisted"]
SLOW = ["04_real_model_smollm2"]


def load(stem: str) -> dict[str, Any]:
    path = TUTORIALS / f"{stem}.ipynb"
    nb: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    assert nb.get("nbformat") == 4, f"{path.name}: not an nbformat 4 notebook"
    assert isinstance(nb.get("cells"), list) and nb["cells"], f"{path.name}: no cells"
    for i, cell in enumerate(nb["cells"]):
        assert cell.get("cell_type") in ("markdown", "code"), f"{path.name} cell {i}: type {cell.get('cell_type')!r}"
        assert isinstance(cell.get("source"), list | str), f"{path.name} cell {i}: source must be a list or str"
        if cell["cell_type"] == "code":
            assert isinstance(cell.get("outputs"), list), f"{path.name} cell {i}: a code cell needs outputs"
    return nb


def source(cell: dict[str, Any]) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def run_notebook(stem: str, monkeypatch: pytest.MonkeyPatch) -> float:
    """Execute every code cell of ``stem`` in order in a fresh namespace; seconds taken."""
    nb = load(stem)
    monkeypatch.chdir(TUTORIALS)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    t0 = time.perf_counter()
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        text = source(cell)
        magic = [line for line in text.splitlines() if line.lstrip().startswith(("%", "!"))]
        assert not magic, f"{stem} cell {i}: IPython magics do not run outside Jupyter: {magic}"
        try:
            exec(compile(text, f"<{stem}.ipynb cell {i}>", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{stem}.ipynb: code cell {i} failed with {exc!r}:\n{text}") from exc
    return time.perf_counter() - t0


def test_every_notebook_is_listed_and_tested() -> None:
    notebooks = sorted(p.stem for p in TUTORIALS.glob("*.ipynb"))
    assert notebooks == sorted(FAST + SLOW)
    readme = (TUTORIALS / "README.md").read_text(encoding="utf-8")
    for stem in notebooks:
        assert f"{stem}.ipynb" in readme, f"tutorials/README.md does not list {stem}.ipynb"
        nb = load(stem)
        kinds = {cell["cell_type"] for cell in nb["cells"]}
        assert kinds == {"markdown", "code"}, f"{stem}: needs both markdown and code cells"


@pytest.mark.parametrize("stem", FAST)
def test_notebook_runs(stem: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seconds = run_notebook(stem, monkeypatch)
    assert capsys.readouterr().out  # the cells print what they show
    print(f"{stem}: {seconds:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stem", SLOW)
def test_real_model_notebook_runs(stem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seconds = run_notebook(stem, monkeypatch)
    print(f"{stem}: {seconds:.1f} s")
