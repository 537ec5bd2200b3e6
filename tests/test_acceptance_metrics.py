"""Acceptance reported as two rates, each named for what it is (types.BoundaryStats):
``acceptance_per_try`` = accepted / tries, the per-token alpha, comparable to 1 - TV; and
``accepted_per_proposed``, the share of drafted tokens kept, below it whenever blocks are longer
than 1 -- in ``pyramid check`` (text and JSON), ``pyramid generate`` and ``pyramid bench``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import stats  # noqa: F401  (one torch thread)

from pyramid_core import Metrics, build_pipeline
from pyramid_core.cli import main
from pyramid_core.testing import TableModel
from pyramid_core.testing.exactness import run_check
from pyramid_core.types import BoundaryStats

Q = [0.5, 0.3, 0.2]
P = [0.2, 0.3, 0.5]
ONE_MINUS_TV = sum(min(p, q) for p, q in zip(P, Q))  # 0.7


def test_tries_count_the_accepted_tokens_and_the_rejection() -> None:
    b = BoundaryStats()
    b.record(4, 2)  # 2 accepted, the 3rd rejected, the 4th never tried: 3 tries
    b.record(4, 4)  # all accepted: 4 tries, no rejection
    b.record(0, 0)  # nothing proposed (ngram): no try
    assert (b.tries, b.accepted, b.proposed) == (7, 6, 8)
    assert b.acceptance_per_try == pytest.approx(6 / 7) and b.accepted_per_proposed == pytest.approx(6 / 8)
    assert b.acceptance_rate == b.accepted_per_proposed  # the old name
    b.record_tree(9, 3, 1)  # a tree: a try per depth, the siblings of one node together
    assert b.tries == 9
    d = b.as_dict()
    assert d["tries"] == 9 and d["acceptance_per_try"] == pytest.approx(7 / 9)
    assert d["accepted_per_proposed"] == d["acceptance_rate"] == pytest.approx(7 / 11)
    assert BoundaryStats.pool([b, b]).tries == 18
    assert math.isnan(BoundaryStats().acceptance_per_try)


def test_per_try_acceptance_is_one_minus_tv_and_accepted_per_proposed_is_below() -> None:
    """Exact pair of context-free tables, blocks of 4, 1500 runs x 8 tokens: every try is an
    independent Bernoulli(1 - TV = 0.7), so the per-try rate is within 4 standard errors of 0.7
    (N = the tries, several thousand); accepted/proposed is far below it (blocks > 1). The old
    "acceptance" of ``pyramid check`` was the latter."""
    pipe = build_pipeline([TableModel(Q), TableModel(P)], ["exact"], [4], stop_ids=[])
    b = Metrics.pool([pipe.generate([0], 8, seed=s).metrics for s in range(1500)]).boundaries[0]
    se = math.sqrt(ONE_MINUS_TV * (1 - ONE_MINUS_TV) / b.tries)
    assert b.tries > 4000
    assert abs(b.acceptance_per_try - ONE_MINUS_TV) < 4 * se, (b.acceptance_per_try, se)
    assert b.accepted_per_proposed < ONE_MINUS_TV - 0.1
    res = run_check([Q, P], ["exact"], [4], samples=400, new_tokens=8, seed=5)
    assert res.acceptance == res.accepted_per_proposed and res.acceptance_per_try[0] > res.acceptance[0]


def test_check_reports_both_rates_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["check", "--dist", "0.5,0.3,0.2", "--dist", "0.2,0.3,0.5", "--length", "3", "--samples", "500",
            "--new-tokens", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("boundary 1->2"))
    assert "acceptance per try" in line and "(1 - TV of the two tables 0.7000)" in line and "accepted/proposed" in line
    assert not any(x.startswith("acceptance ") for x in out.splitlines())
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["one_minus_tv"] == [pytest.approx(ONE_MINUS_TV)]
    assert data["acceptance"] == data["accepted_per_proposed"]  # the old key, kept
    assert data["acceptance_per_try"][0] > data["accepted_per_proposed"][0]


def test_generate_reports_both_rates(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_models: dict[str, Any]
                                     ) -> None:
    from pyramid_core.backends.hf.tiny import save_with_words

    target = save_with_words(tiny_models["target"], tmp_path / "target")
    draft = save_with_words(tiny_models["far"], tmp_path / "far")
    metrics = tmp_path / "m.json"
    assert main(["generate", "--prompt", "w1 w2 w3", "--no-chat", "--stage", f"hf:path={draft}", "--stage",
                 f"hf:path={target}", "--length", "4", "--max-new-tokens", "16", "--metrics", str(metrics)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("boundary 1->2"))
    assert "acceptance per try" in line and "accepted/proposed" in line
    b = json.loads(metrics.read_text())["metrics"]["boundaries"][0]
    assert b["acceptance_per_try"] == b["accepted"] / b["tries"]
    assert b["accepted_per_proposed"] == b["acceptance_rate"] == b["accepted"] / b["proposed"]
