"""Where a Hugging Face stage's execution mode is decided: once, when the stage is built.

``resolve_mode`` is the one meaning of ``ExecutionMode.AUTO`` for every model stage of this
backend (``HFStage``, ``FeatureStage``): the fast mode (``fast``: oneDNN pre-packed weights) for
a float32 stage on a CPU whose torch build can pre-pack, eager everywhere else. An explicit
``FAST`` where that mode is unsupported is an error naming the stage and what would work.
"""

from __future__ import annotations

import torch

from pyramid_core.backends.hf.fast import packing_available
from pyramid_core.options import ExecutionMode

__all__ = ["resolve_mode", "fast_supported"]


def fast_supported(device: torch.device, dtype: torch.dtype) -> str | None:
    """``None`` if the fast mode runs a stage on ``device`` in ``dtype``, else why not."""
    if device.type != "cpu":
        return f"the fast mode is implemented for CPU stages (oneDNN pre-packed weights); this stage is on {device}"
    if not packing_available():
        return "the fast mode needs a torch build with oneDNN (mkldnn), which this one lacks"
    if dtype != torch.float32:
        return f"the fast mode on CPU runs float32 weights, this stage has {dtype}"
    return None


def resolve_mode(mode: ExecutionMode, device: torch.device, dtype: torch.dtype, stage: str) -> ExecutionMode:
    """``EAGER`` or ``FAST`` for stage ``stage`` (module docstring)."""
    why = fast_supported(device, dtype)
    if mode is ExecutionMode.AUTO:
        return ExecutionMode.EAGER if why else ExecutionMode.FAST
    if mode is ExecutionMode.FAST and why:
        raise ValueError(f"stage {stage!r}: compile=true: {why}; use compile=false (eager) or auto")
    return mode
