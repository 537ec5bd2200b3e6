"""Device helpers shared by everything that times work on an accelerator."""

from __future__ import annotations

import torch

__all__ = ["sync"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a host clock times it; a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
