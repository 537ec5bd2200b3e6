"""``load_tokenizer`` reads a tokenizer directory whose ``tokenizer_class`` this transformers
version does not know -- what transformers 5 writes ("TokenizersBackend") read by 4.x -- through
its ``tokenizer.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyramid_core.backends.hf.loading import load_tokenizer
from pyramid_core.backends.hf.tiny import word_tokenizer

WORDS = ["<unk>", "red", "green", "blue"]


def saved(path: Path, tokenizer_class: str | None) -> Path:
    word_tokenizer(WORDS).save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = tokenizer_class
    config_file.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("tokenizer_class", ["PreTrainedTokenizerFast", "NoSuchTokenizerClass"])
def test_a_saved_tokenizer_loads_whatever_class_it_names(tmp_path: Path, tokenizer_class: str) -> None:
    tokenizer = load_tokenizer(saved(tmp_path, tokenizer_class))
    assert len(tokenizer) == len(WORDS)
    assert tokenizer("blue red")["input_ids"] == [3, 1]


def test_an_unknown_class_without_tokenizer_json_is_still_an_error(tmp_path: Path) -> None:
    saved(tmp_path, "NoSuchTokenizerClass")
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError):  # transformers' own error, not a fallback that hides it
        load_tokenizer(tmp_path)
