"""Damaged model files are named with their fix; ``pyramid setup`` repairs its cache.

Everything runs on a tiny model under a ``PYRAMID_HOME`` in ``tmp_path`` (never the real cache)
and on copies of the shipped family's stages.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from pyramid_core.backends.hf import smollm2
from pyramid_core.backends.hf.files import fix_for
from pyramid_core.backends.hf.head import load_feature_head
from pyramid_core.backends.hf.loading import load_model, load_tokenizer
from pyramid_core.backends.hf.smollm2 import (
    MANIFEST,
    ensure_smollm2,
    family_dir,
    smollm2_dir,
    verify_smollm2,
)
from pyramid_core.backends.hf.stage import HFStage
from pyramid_core.backends.hf.tiny import save_with_words, tiny_llama
from pyramid_core.errors import ConfigError

WEIGHTS = "model.safetensors"


def _fake_convert(tmp: Path, out: Path, progress: bool, wheel: Any) -> dict[str, Any]:
    save_with_words(tiny_llama(0), out)
    return {"model": "tiny stand-in"}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A fake ``PYRAMID_HOME`` whose conversion (no wheel download) is counted; set up once."""
    monkeypatch.setenv("PYRAMID_HOME", str(tmp_path / "home"))
    calls: list[int] = []

    def convert(*args: Any) -> dict[str, Any]:
        calls.append(1)
        return _fake_convert(*args)

    monkeypatch.setattr(smollm2, "_convert", convert)
    ensure_smollm2(progress=False)
    assert len(calls) == 1
    return calls


def _truncate(path: Path, size: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


def test_setup_records_every_file(home: list[int]) -> None:
    files = json.loads((smollm2_dir() / MANIFEST).read_text())["files"]
    assert {"config.json", WEIGHTS, "tokenizer.json"} <= set(files)
    assert files[WEIGHTS]["size"] == (smollm2_dir() / WEIGHTS).stat().st_size
    assert len(files[WEIGHTS]["sha256"]) == 64


@pytest.mark.parametrize("size", [None, 0])
@pytest.mark.parametrize("recorded", [True, False])
def test_damaged_weights_are_named_on_load(home: list[int], size: int | None, recorded: bool) -> None:
    d = smollm2_dir()
    if not recorded:  # a cache set up before files were recorded: the header check catches it
        manifest = json.loads((d / MANIFEST).read_text())
        del manifest["files"]
        (d / MANIFEST).write_text(json.dumps(manifest))
    _truncate(d / WEIGHTS, size)
    what = "empty" if size == 0 else "truncated"
    with pytest.raises(ConfigError, match=rf"{WEIGHTS} is {what}.*run `pyramid setup` to repair it"):
        load_model(d)


@pytest.mark.parametrize("damage", ["truncate", "empty", "alter", "delete tokenizer.json"])
def test_setup_repairs_a_damaged_cache(home: list[int], damage: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pyramid_core")
    d = smollm2_dir()
    ensure_smollm2(progress=False)
    assert len(home) == 1  # intact: nothing converted again
    weights = d / WEIGHTS
    if damage == "truncate":
        _truncate(weights)
    elif damage == "empty":
        _truncate(weights, 0)
    elif damage == "alter":  # same size, one byte flipped: only the sha256 sees it
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        recorded = json.loads((d / MANIFEST).read_text())["files"][WEIGHTS]["mtime_ns"]
        os.utime(weights, ns=(recorded + 10**9, recorded + 10**9))  # timestamps may be coarser than this test
        verify_smollm2(d)  # the cheap on-load check passes ...
        with pytest.raises(ConfigError, match=f"{WEIGHTS} is altered: its sha256"):
            verify_smollm2(d, full=True)  # ... the one `pyramid setup` runs does not
    else:
        (d / "tokenizer.json").unlink()
    assert ensure_smollm2(progress=False) == d
    assert len(home) == 2
    verify_smollm2(d, rehash=True)
    assert load_model(d) is not None and load_tokenizer(d) is not None
    if damage != "delete tokenizer.json":
        assert "converting again" in caplog.text  # logged, whatever the caller's verbosity


def test_setup_records_an_older_cache_without_converting(home: list[int]) -> None:
    d = smollm2_dir()
    manifest = json.loads((d / MANIFEST).read_text())
    del manifest["files"]
    (d / MANIFEST).write_text(json.dumps(manifest))
    ensure_smollm2(progress=False)
    assert len(home) == 1
    assert WEIGHTS in json.loads((d / MANIFEST).read_text())["files"]


def _stage_copy(tmp_path: Path, role: str) -> Path:
    dest = tmp_path / role
    shutil.copytree(family_dir() / role, dest)
    return dest


@pytest.mark.parametrize("role", ["draft", "feature"])
def test_shipped_stage_weights_are_checked_against_their_record(home: list[int], tmp_path: Path, role: str) -> None:
    stage = _stage_copy(tmp_path, role)
    recorded = json.loads((stage / "stage.json").read_text())["weights"]
    assert recorded["size"] == (family_dir() / role / WEIGHTS).stat().st_size
    _truncate(stage / WEIGHTS)
    with pytest.raises(ConfigError, match=rf"{WEIGHTS} is truncated: \d+ bytes, (its header says )?{recorded['size']}"):
        load_feature_head(stage, None) if role == "feature" else load_model(stage)


def test_the_fix_for_the_shipped_family_is_reinstalling() -> None:
    assert "reinstall" in fix_for(family_dir() / "draft" / WEIGHTS)


@pytest.mark.parametrize(("role", "declared", "held"), [("draft", 4096, "a 8192-token sub-vocabulary head"),
                                                         ("draft", None, "a 8192-token sub-vocabulary head"),
                                                         ("feature", 0, "a 8192-token sub-vocabulary head")])
def test_a_sub_vocab_that_disagrees_with_the_weights_names_both(home: list[int], tmp_path: Path, role: str,
                                                                declared: int | None, held: str) -> None:
    stage = _stage_copy(tmp_path, role)
    info = json.loads((stage / "stage.json").read_text())
    if role == "feature":
        info["architecture"]["sub_vocab"] = declared
    else:
        info["sub_vocab"] = declared
    (stage / "stage.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=rf"says sub_vocab={declared} but .*{WEIGHTS} holds {held}"):
        load_feature_head(stage, None) if role == "feature" else load_model(stage)


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    return Path(save_with_words(tiny_llama(1), tmp_path / "plain"))


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_garbage_json_file_is_named(plain: Path, name: str) -> None:
    (plain / name).write_text("{\n  garbage")
    with pytest.raises(ConfigError, match=rf"{plain / name} is not valid JSON \(Expecting"):
        HFStage.from_pretrained(plain)


def test_a_garbage_stage_json_is_named(home: list[int], tmp_path: Path) -> None:
    stage = _stage_copy(tmp_path, "draft")
    (stage / "stage.json").write_bytes(b"\x00\xff garbage")
    with pytest.raises(ConfigError, match=rf"{stage / 'stage.json'} is not valid JSON"):
        HFStage.from_pretrained(stage)


def test_a_garbage_manifest_is_named(home: list[int]) -> None:
    (smollm2_dir() / MANIFEST).write_text("")
    with pytest.raises(ConfigError, match=rf"{MANIFEST} is not valid JSON.*run `pyramid setup`"):
        load_model(smollm2_dir())


@pytest.mark.parametrize(("name", "text", "message"), [
    ("config.json", "{}", "transformers cannot load the model in"),
    ("tokenizer.json", '{"version": "1.0"}', "the tokenizer in .* cannot be read"),
])
def test_a_file_transformers_cannot_read_is_named_with_the_fix(plain: Path, name: str, text: str, message: str) -> None:
    (plain / name).write_text(text)
    with pytest.raises(ConfigError, match=rf"{message}.*replace it with a good copy"):
        HFStage.from_pretrained(plain)
