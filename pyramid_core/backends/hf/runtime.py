"""Where a Hugging Face stage's dtype and execution mode are decided: once, when it is built.

- ``native_dtype(device)``: what ``dtype=auto`` means -- ``bfloat16`` where the device computes
  it natively (CUDA devices that support it; CPUs with AMX or AVX512-BF16), ``float32`` elsewhere.
- ``resolve_mode``: the one meaning of ``ExecutionMode.AUTO`` for every model stage of this
  backend (``HFStage``, ``FeatureStage``): ``GRAPHS`` on a CUDA device; on a CPU whose torch build
  can pre-pack weights, ``AUTO`` stays ``AUTO`` -- the stage then times its candidate modes
  (``measured_candidates``: eager, pre-packed, and with ``$PYRAMID_AUTO_COMPILED=1`` the compiled
  mode) and runs the fastest per fed length (``backends.hf.choice``); ``EAGER``
  everywhere else. An explicit mode the stage cannot run here is an error naming the stage and
  what would work.
"""

from __future__ import annotations

import os

import torch

from pyramid_core.backends.hf.fast import packing_available
from pyramid_core.options import ExecutionMode

__all__ = ["resolve_mode", "unsupported", "measured_candidates", "native_dtype", "packing_bf16_available", "ALL_MODES", "FAST_DTYPES",
           "AUTO_COMPILED_ENV", "COMPILED_MIN_TORCH", "torch_release"]

ALL_MODES = frozenset({ExecutionMode.EAGER, ExecutionMode.FAST, ExecutionMode.GRAPHS, ExecutionMode.STATIC,
                       ExecutionMode.COMPILED})

AUTO_COMPILED_ENV = "PYRAMID_AUTO_COMPILED"
# The oldest torch the compiled mode is tested on without compiling again across rounds
# (tests/test_graphs.py counts compiles; 2.6, the lowest torch supported, fails that count).
COMPILED_MIN_TORCH = (2, 13)


def torch_release() -> tuple[int, int]:
    """(major, minor) of the running torch."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)
"""Set to 1, ``auto`` also times the compiled mode (inductor; compiling every bucket of every stage
costs seconds to minutes on a machine's first run, hence opt-in)."""

FAST_DTYPES = (torch.float32, torch.bfloat16)
"""The dtypes oneDNN pre-packs on CPU (bfloat16 through AMX or AVX512-BF16 kernels)."""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX tiles or AVX512-BF16), as torch sees it."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def packing_bf16_available() -> bool:
    """Whether oneDNN pre-packs bfloat16 weights on this CPU: its bfloat16 reorder needs AVX-512
    (BW, VL, DQ) or AVX-NE-CONVERT, which an AVX2-only CPU lacks (as oneDNN's own check says)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the check: what bfloat16 auto-selection assumes
        return cpu_has_native_bf16()


def native_dtype(device: torch.device | str) -> torch.dtype:
    """What ``dtype=auto`` loads a stage in on ``device`` (module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def measured_candidates(device: torch.device, dtype: torch.dtype,
                        supported: frozenset[ExecutionMode] = ALL_MODES) -> tuple[ExecutionMode, ...]:
    """The modes ``AUTO`` times on ``device`` in ``dtype``, eager first; one mode means nothing to
    measure."""
    modes = [ExecutionMode.EAGER]
    if ExecutionMode.FAST in supported and unsupported(ExecutionMode.FAST, device, dtype) is None:
        modes.append(ExecutionMode.FAST)
    if (os.environ.get(AUTO_COMPILED_ENV, "").strip().lower() in ("1", "true", "yes")
            and ExecutionMode.COMPILED in supported and unsupported(ExecutionMode.COMPILED, device, dtype) is None):
        modes.append(ExecutionMode.COMPILED)
    return tuple(modes)


def unsupported(mode: ExecutionMode, device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` if ``mode`` runs a stage on ``device`` in ``dtype``, else why not."""
    if mode is ExecutionMode.FAST:
        if device.type != "cpu":
            return f"the fast mode is implemented for CPU stages (oneDNN pre-packed weights); this stage is on {device}"
        if not packing_available():
            return "the fast mode needs a torch build with oneDNN (mkldnn), which this one lacks"
        if dtype not in FAST_DTYPES:
            return f"the fast mode on CPU runs float32 or bfloat16 weights, this stage has {dtype}"
        if dtype == torch.bfloat16 and not packing_bf16_available():
            return ("oneDNN pre-packs bfloat16 weights only on CPUs with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, "
                    "which this one lacks; run this stage in float32 for the fast mode")
    if mode is ExecutionMode.COMPILED and device.type != "cpu":
        return (f"the compiled mode compiles static forwards with inductor for CPU stages; this stage is on {device} "
                "(compile=graphs captures them as CUDA graphs)")
    if mode is ExecutionMode.COMPILED and torch_release() < COMPILED_MIN_TORCH:
        return (f"the compiled mode needs torch >= {'.'.join(map(str, COMPILED_MIN_TORCH))} (torch 2.6 guards on the "
                f"cache's fill position and compiles again at every position); this is torch {torch.__version__}")
    if mode is ExecutionMode.GRAPHS and device.type != "cuda":
        return f"the graph mode captures CUDA graphs; this stage is on {device} (compile=static runs the same forwards)"
    return None


def resolve_mode(mode: ExecutionMode, device: torch.device, dtype: torch.dtype, stage: str,
                 supported: frozenset[ExecutionMode] = ALL_MODES) -> ExecutionMode:
    """The mode of stage ``stage``: ``AUTO`` only where it is measured (module docstring)."""
    if mode is ExecutionMode.AUTO:
        if ExecutionMode.GRAPHS in supported and unsupported(ExecutionMode.GRAPHS, device, dtype) is None:
            return ExecutionMode.GRAPHS
        return ExecutionMode.AUTO if len(measured_candidates(device, dtype, supported)) > 1 else ExecutionMode.EAGER
    if mode not in supported:
        valid = ", ".join(sorted(m.value for m in supported | {ExecutionMode.AUTO}))
        raise ValueError(f"stage {stage!r}: compile={mode.value} is not available for this kind of stage (valid: {valid})")
    why = unsupported(mode, device, dtype)
    if why:
        word = "true" if mode is ExecutionMode.FAST else mode.value
        raise ValueError(f"stage {stage!r}: compile={word}: {why}; use compile=false (eager) or auto")
    return mode
