"""Where a Hugging Face stage's execution mode is decided: once, when the stage is built.

``resolve_mode`` is the one meaning of ``ExecutionMode.AUTO`` for every model stage of this
backend (``HFStage``, ``FeatureStage``): among the modes the stage supports, ``GRAPHS`` on a CUDA
device, ``FAST`` (oneDNN pre-packed weights) for a float32 stage on a CPU whose torch build can
pre-pack, ``EAGER`` everywhere else. An explicit mode the stage cannot run here is an error naming
the stage and what would work.
"""

from __future__ import annotations

import torch

from pyramid_core.backends.hf.fast import packing_available
from pyramid_core.options import ExecutionMode

__all__ = ["resolve_mode", "unsupported", "ALL_MODES"]

ALL_MODES = frozenset({ExecutionMode.EAGER, ExecutionMode.FAST, ExecutionMode.GRAPHS, ExecutionMode.STATIC})


def unsupported(mode: ExecutionMode, device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` if ``mode`` runs a stage on ``device`` in ``dtype``, else why not."""
    if mode is ExecutionMode.FAST:
        if device.type != "cpu":
            return f"the fast mode is implemented for CPU stages (oneDNN pre-packed weights); this stage is on {device}"
        if not packing_available():
            return "the fast mode needs a torch build with oneDNN (mkldnn), which this one lacks"
        if dtype != torch.float32:
            return f"the fast mode on CPU runs float32 weights, this stage has {dtype}"
    if mode is ExecutionMode.GRAPHS and device.type != "cuda":
        return f"the graph mode captures CUDA graphs; this stage is on {device} (compile=static runs the same forwards)"
    return None


def resolve_mode(mode: ExecutionMode, device: torch.device, dtype: torch.dtype, stage: str,
                 supported: frozenset[ExecutionMode] = ALL_MODES) -> ExecutionMode:
    """A concrete mode (not ``AUTO``) for stage ``stage`` (module docstring)."""
    if mode is ExecutionMode.AUTO:
        for choice in (ExecutionMode.GRAPHS, ExecutionMode.FAST):
            if choice in supported and unsupported(choice, device, dtype) is None:
                return choice
        return ExecutionMode.EAGER
    if mode not in supported:
        valid = ", ".join(sorted(m.value for m in supported | {ExecutionMode.AUTO}))
        raise ValueError(f"stage {stage!r}: compile={mode.value} is not available for this kind of stage (valid: {valid})")
    why = unsupported(mode, device, dtype)
    if why:
        word = "true" if mode is ExecutionMode.FAST else mode.value
        raise ValueError(f"stage {stage!r}: compile={word}: {why}; use compile=false (eager) or auto")
    return mode
