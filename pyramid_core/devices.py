"""Device helpers shared by everything that places or times work on an accelerator."""

from __future__ import annotations

import functools

import torch

from pyramid_core.errors import ConfigError

__all__ = ["sync", "check_device", "usable_devices", "cpu_name"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a host clock times it; a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def usable_devices() -> list[str]:
    """The device types this torch build can use here (``cpu`` always)."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda" if torch.cuda.device_count() == 1 else f"cuda (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


@functools.cache
def check_device(device: str) -> str:
    """``device`` if a tensor can be placed there, else a ``ConfigError`` saying why and which
    devices are usable -- before a model is loaded (cached per device string)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = reason if len(reason) <= 160 else reason[:reason.rfind(" ", 0, 150)] + " ..."
        raise ConfigError(f"device {device!r} is not usable here ({reason}); usable: {', '.join(usable_devices())}") from None
    return device


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's words elsewhere), for reports and
    for the keys of measured choices: ratios measured on one CPU do not hold on another."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
