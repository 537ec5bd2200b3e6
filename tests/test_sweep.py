"""``pyramid sweep``: presets over tau values on tiny random models, the speed-quality frontier."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pyramid_core.backends.hf.tiny import save_with_words
from pyramid_core.cli import main
from pyramid_core.lab.sweep import with_tau
from pyramid_core.plugins import registries


def test_with_tau_sets_the_threshold_of_policies_that_take_one() -> None:
    regs = registries()
    assert with_tau("fuzzy:div=js,tau=0.4", 0.1, regs) == "fuzzy:div=js,tau=0.1"
    assert with_tau("exact", 0.1, regs) == "exact"
    assert with_tau("assisted", 0.1, regs) == "assisted"


def test_cli_sweep_several_presets(tiny_models: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = save_with_words(tiny_models["target"], tmp_path / "target")
    draft = save_with_words(tiny_models["near"], tmp_path / "near")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2 w3 w4\nw5 w6 w7\n")
    out = tmp_path / "out"
    args = ["sweep", "--preset", "fsd", "--preset", "sd", "--stage", f"hf:path={draft}", "--stage", f"hf:path={target}",
            "--taus", "0.05,0.6", "--prompts", str(prompts), "--max-new-tokens", "8", "--no-chat", "--no-compile",
            "--out", str(out)]
    assert main(args) == 0
    data = json.loads((out / "sweep.json").read_text())
    labels = [p["label"] for p in data["points"]]
    assert labels == ["target alone", "fsd", "fsd", "sd", "sd"]
    fsd = [p for p in data["points"] if p["label"] == "fsd"]
    assert [p["tau"] for p in fsd] == [0.05, 0.6] and fsd[0]["block_lengths"] == [8]
    # a looser threshold accepts more and moves further from the target's greedy text
    assert fsd[1]["acceptance"][0] >= fsd[0]["acceptance"][0]
    sd = [p for p in data["points"] if p["label"] == "sd"]
    assert all(p["policies"] == ["exact"] for p in sd)
    assert (out / "sweep.png").stat().st_size > 0 and (out / "sweep.csv").is_file()
    assert "fsd" in capsys.readouterr().out
