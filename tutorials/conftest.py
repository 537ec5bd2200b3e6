"""The tutorials are tested as notebooks by nbval: every code cell is re-executed in a fresh
kernel (this interpreter's environment) and its outputs are compared with the committed ones, so
a notebook whose code changed but whose outputs were not refreshed fails.

Collecting this directory switches nbval on (``python -m pytest`` from the repository root, or
``pytest tutorials``), with the sanitizer ``sanitize.cfg`` beside this file: it masks only
wall-clock numbers (seconds, tokens/s, speed ratios), which legitimately differ between runs.
Everything else is compared as text; PNG plots are not compared byte for byte (nbval's default),
but the numbers they show are printed in the same cells. The notebooks in ``SLOW`` load the real
SmolLM2-135M and are marked ``slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SLOW = {"04_real_model_smollm2.ipynb", "09_quality_budgets.ipynb"}  # the real SmolLM2-135M (`pyramid setup`)


def pytest_configure(config: pytest.Config) -> None:
    opt = config.option
    if not opt.nbval_lax:
        opt.nbval = True  # compare every output, not only cells marked NBVAL_CHECK_OUTPUT
    opt.nbval_current_env = True  # this interpreter's packages, not a kernel found elsewhere
    if opt.nbval_sanitize_with is None:
        opt.nbval_sanitize_with = str(HERE / "sanitize.cfg")
    if opt.nbval_cell_timeout == 2000:  # nbval's default: far more than any cell here needs
        opt.nbval_cell_timeout = 300


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.parent == HERE and item.path.name in SLOW:
            item.add_marker(pytest.mark.slow)
