"""Loading models and tokenizers from local directories: plain Hugging Face model folders and
the distilled stages written by ``pyramid distill`` (``hf.student``); a Hugging Face id is first
resolved to its cached snapshot (``hf.hub``). The bottom of ``hf/``: it imports nothing of
pyramid but the student format and ``hub``, and every loader above shares its cache."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pyramid_core.backends.hf.files import (
    check_json_files,
    check_record,
    check_safetensors,
    fix_for,
    read_json,
)
from pyramid_core.backends.hf.hub import resolve_model_dir
from pyramid_core.backends.hf.runtime import native_dtype
from pyramid_core.backends.hf.student import (
    STAGE_FILE,
    WEIGHTS_FILE,
    build_student,
    is_student_dir,
    student_base,
    trainable_state,
)
from pyramid_core.errors import ConfigError

__all__ = ["resolve_dtype", "load_model", "load_tokenizer", "check_model_dir", "check_weights"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """``"bfloat16"`` / ``"bf16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; ``"auto"`` -> what
    ``device`` computes natively (``runtime.native_dtype``); a clear error otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    word = dtype.strip().lower().removeprefix("torch.")
    if word == "auto":
        return native_dtype(device)
    try:
        return _DTYPES[word]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(sorted(_DTYPES))}") from None


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` since transformers 4.56, ``torch_dtype=`` before."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


_LOADED: weakref.WeakValueDictionary[tuple[str, str, torch.dtype], Any] = weakref.WeakValueDictionary()


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32") -> Any:
    """``AutoModelForCausalLM`` from a local directory or a Hugging Face id (``hub.resolve_model_dir``),
    in eval mode on ``device``; loaded once per (directory, device, dtype) while any stage still uses it."""
    path = resolve_model_dir(path).resolve()
    student = is_student_dir(path)
    if not student and not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model directory (no config.json) nor a distilled stage (no stage.json)")
    dev = torch.device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    key = (str(path), str(dev), torch_dtype)
    model: Any = _LOADED.get(key)
    if model is None and student:
        model = _load_student(path, device=dev, dtype=torch_dtype)
        _LOADED[key] = model
    if model is None:
        from transformers import AutoModelForCausalLM

        check_model_dir(path)
        try:
            with _progress_on_terminals_only():
                model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **_dtype_kwarg(torch_dtype))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            check_json_files(path)  # names a file that is not JSON
            reason = " ".join(str(exc).split())  # one line, whatever the library's message holds
            raise ConfigError(f"transformers cannot load the model in {path} ({type(exc).__name__}: {reason}); "
                              f"{fix_for(path / 'config.json')}") from exc
        model.to(dev).eval()
        _LOADED[key] = model
    return model


def check_model_dir(path: Path) -> None:
    """The cheap checks before loading a model folder: the sizes its manifest records (one that
    ``pyramid setup`` wrote) and that ``model.safetensors`` is as long as its header says. A
    ``ConfigError`` names the file and the fix."""
    from pyramid_core.backends.hf.smollm2 import MANIFEST

    if (path / MANIFEST).is_file():
        files = read_json(path / MANIFEST).get("files")
        for name, record in (files if isinstance(files, dict) else {}).items():
            check_record(path / name, record)
    if (path / WEIGHTS_FILE).is_file():
        check_safetensors(path / WEIGHTS_FILE)


@contextmanager
def _progress_on_terminals_only() -> Iterator[None]:
    """transformers' weight-loading progress bar only when stderr is a terminal: in logs and
    pipes it is noise before a command's own output (and its one-line errors)."""
    from transformers.utils import logging as transformers_logging

    hf_logging: Any = transformers_logging  # untyped
    quiet = not sys.stderr.isatty() and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet:
            hf_logging.enable_progress_bar()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved next to a model, or ``None`` when the directory has none."""
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    try:
        return _read_tokenizer(path)
    except Exception as exc:  # the tokenizers library raises a bare Exception for a bad file
        check_json_files(path, _TOKENIZER_FILES + ("special_tokens_map.json",))  # names a file that is not JSON
        reason = " ".join(str(exc).split())  # one line, whatever the library's message holds
        raise ConfigError(f"the tokenizer in {path} cannot be read ({type(exc).__name__}: {reason}); "
                          f"{fix_for(path / 'tokenizer.json')}") from exc


def _read_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except ValueError:
        # transformers 5 saves fast tokenizers as class "TokenizersBackend", which 4.x does not
        # know; both read the same tokenizer.json
        if not (path / "tokenizer.json").is_file():
            raise
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


def _load_student(path: Path, *, device: torch.device, dtype: torch.dtype) -> Any:
    """The student model in a folder written by ``student.save_student``. Its base model (the
    target, whose embedding it shares) is loaded through ``load_model`` and so shared with a
    target stage."""
    from safetensors.torch import load_file

    base_dir = student_base(path)
    info = read_json(path / STAGE_FILE)
    check_safetensors(path / WEIGHTS_FILE)
    target = load_model(base_dir, device=device, dtype=dtype)
    state = load_file(str(path / WEIGHTS_FILE))
    sub = state.get("lm_head.token_ids")
    declared, held = info.get("sub_vocab") or None, None if sub is None else int(sub.numel())
    if declared != held:
        raise ConfigError(f"{path / STAGE_FILE} says sub_vocab={declared} but {path / WEIGHTS_FILE} holds "
                          + ("a full head" if held is None else f"a {held}-token sub-vocabulary head")
                          + f"; {fix_for(path / STAGE_FILE)}")
    student = build_student(target, info["layers"], sub)
    expected = set(trainable_state(student))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{path / WEIGHTS_FILE} does not match stage.json: missing {missing[:4]}, unexpected {extra[:4]}")
    check_weights(path, info)
    student.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    student.config.name_or_path = str(path)
    # keep the base model alive (not as a submodule): a target stage loaded later from the same
    # directory then reuses it, and with it the embedding this student shares
    object.__setattr__(student, "_pyramid_base", target)
    return student.to(device).eval()


def check_weights(path: Path, info: dict[str, Any]) -> None:
    """A distilled stage's weights against their safetensors header and the size its
    ``stage.json`` records (``"weights"``; a stage written before pyramid recorded it has none)."""
    check_safetensors(path / WEIGHTS_FILE)
    record = info.get("weights")
    if isinstance(record, dict):
        check_record(path / WEIGHTS_FILE, record)
