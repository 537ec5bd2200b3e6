"""The tutorials are committed executed, and the check that re-executes them can fail.

The notebooks themselves are run by nbval when pytest collects ``tutorials/`` (see
``tutorials/conftest.py``): every cell is re-executed and its outputs compared with the
committed ones, wall-clock figures masked by ``tutorials/sanitize.cfg``. This file checks what
that comparison cannot: that every notebook is listed, was executed top to bottom in one
kernel, carries no error, machine path or bulky image -- and, as negative controls on small
synthetic notebooks run through the same configuration, that a stale output or a cell whose
outputs were never committed fails while timing noise does not.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
MACHINE_PATH = re.compile(r"(/home/|/root/|/tmp/|/work/|/Users/|site-packages|[A-Z]:\\)")
MAX_PNG_BYTES = 80_000
MAX_NOTEBOOK_BYTES = 200_000


def text_of(output: dict[str, Any]) -> str:
    if output["output_type"] == "stream":
        return str(output["text"])
    if output["output_type"] == "error":
        return "\n".join(output["traceback"])
    return str(output.get("data", {}).get("text/plain", ""))


def test_every_notebook_is_listed_in_the_tutorials_readme() -> None:
    readme = (TUTORIALS / "README.md").read_text(encoding="utf-8")
    assert len(NOTEBOOKS) >= 7
    listed = set(re.findall(r"\((\d\d_[a-z0-9_]+\.ipynb)\)", readme))
    assert listed == {nb.name for nb in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_executed_and_clean(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and any(cell.cell_type == "markdown" for cell in nb.cells)
    # executed top to bottom in one kernel: 1, 2, 3, ... (a cell re-run by hand breaks the run)
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), path.name
    assert sum(len(cell.outputs) for cell in code) >= len(code) // 2, f"{path.name}: most cells show nothing"
    for i, cell in enumerate(code, 1):
        assert "execution" not in cell.metadata, f"{path.name} cell [{i}]: timing metadata committed"
        for output in cell.outputs:
            assert output["output_type"] != "error", f"{path.name} cell [{i}] failed:\n{text_of(output)}"
            assert output.get("name") != "stderr", f"{path.name} cell [{i}] wrote to stderr:\n{text_of(output)}"
            found = MACHINE_PATH.search(text_of(output))
            assert not found, f"{path.name} cell [{i}]: a machine path in the output ({found.group()!r})"
            png = output.get("data", {}).get("image/png")
            if png:
                assert len(base64.b64decode(png)) <= MAX_PNG_BYTES, f"{path.name} cell [{i}]: PNG over {MAX_PNG_BYTES} bytes"
    assert path.stat().st_size <= MAX_NOTEBOOK_BYTES, f"{path.name}: {path.stat().st_size} bytes"


# ----------------------------------------------------------------------------------------------
# negative controls: the nbval configuration of tutorials/ on synthetic notebooks
# ----------------------------------------------------------------------------------------------


def notebook(source: str, committed: str | None) -> Any:
    """One code cell, executed once, with ``committed`` as its recorded stdout (None: none)."""
    cell = new_code_cell(source, execution_count=1)
    if committed is not None:
        cell.outputs = [new_output("stream", name="stdout", text=committed)]
    nb = new_notebook(cells=[cell])
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    return nb


def test_the_staleness_check_fails_stale_outputs_and_ignores_timing_noise(tmp_path: Path) -> None:
    for name in ("conftest.py", "sanitize.cfg"):
        shutil.copy(TUTORIALS / name, tmp_path / name)
    cases = {
        # outputs identical but for wall-clock figures: passes
        "timing_noise": notebook('print("tokens: 4; took 0.12 s, 3.5 ms per forward, 123.4 tokens/s (1.07x HF)")',
                                 "tokens: 4; took 9.81 s, 12 ms per forward, 7.0 tokens/s (0.93x HF)\n"),
        # a right-aligned figure whose width changed: passes
        "padded_timing": notebook('print("draft" + " " * 4 + "1.25 ms per token")', "draft  11.25 ms per token\n"),
        # the code changed, the committed output did not: fails
        "stale": notebook('print("tokens:", 2 + 3)', "tokens: 4\n"),
        # a count is not a timing, even next to one: fails
        "stale_count": notebook('print("5 tokens in 0.5 s")', "4 tokens in 0.5 s\n"),
        # a cell whose outputs were never committed: fails
        "never_executed": notebook('print("tokens:", 4)', None),
    }
    for name, nb in cases.items():
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    outcomes = {nb: outcome for outcome, nb in re.findall(r"^(PASSED|FAILED) (\w+)\.ipynb::", run.stdout, flags=re.MULTILINE)}
    assert outcomes == {"timing_noise": "PASSED", "padded_timing": "PASSED", "stale": "FAILED", "stale_count": "FAILED",
                        "never_executed": "FAILED"}, run.stdout + run.stderr


def test_the_real_model_notebooks_are_marked_slow() -> None:
    """`-m "not slow"` (the fast suite) runs every notebook but the SmolLM2 ones."""
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-m", "not slow", str(TUTORIALS)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    collected = set(re.findall(r"^tutorials/(\w+)\.ipynb::", run.stdout, flags=re.MULTILINE))
    assert collected == {p.stem for p in NOTEBOOKS} - {"04_real_model_smollm2", "09_quality_budgets"}, run.stdout + run.stderr
