"""What every results file records of the run that made it: the command, its effective
arguments (enough to run it again: ``pyramid CMD --config RESULTS.json``), and the versions and
machine the numbers belong to (``versions``).

Results files embed ``run_record(...)`` under the key ``"run"`` (bench.json under
``"meta"``), e.g.::

    {"command": "pyramid bench", "arguments": {"max_new_tokens": 24, ...},
     "versions": {"python": "3.11.9", "torch": "2.5.1", "transformers": "4.57.1",
                  "pyramid-core": "0.1.0", "cpu": "AMD EPYC ...", "gpu": null,
                  "stages": [{"name": "smollm2", "dtype": "bfloat16", "modes": "...", ...}]}}
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

__all__ = ["versions", "run_record"]


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _stage(stage: Any) -> dict[str, Any]:
    """A loaded stage's name, device, dtype and execution modes (what it has of them)."""
    out: dict[str, Any] = {"name": str(getattr(stage, "name", stage))}
    for key, attr in (("device", "device"), ("dtype", "dtype"), ("modes", "mode_summary")):
        value = getattr(stage, attr, None)
        if value is not None:
            out[key] = str(value).removeprefix("torch.")
    return out


def versions(stages: Iterable[Any] = ()) -> dict[str, Any]:
    """Python, torch, transformers and pyramid-core versions, the platform, CPU and GPU names,
    torch's threads, and each loaded stage's device, dtype and execution modes."""
    import torch

    from pyramid_core import __version__
    from pyramid_core.devices import cpu_name

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "pyramid-core": _version("pyramid-core") or __version__,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "stages": [_stage(s) for s in stages],
    }


def run_record(command: str, arguments: Mapping[str, Any], stages: Iterable[Any] = ()) -> dict[str, Any]:
    """``{"command", "arguments", "versions"}`` of a run (module docstring); ``arguments`` as
    ``pyramid_core.cli.config.run_arguments`` gives them."""
    return {"command": command, "arguments": dict(arguments), "versions": versions(stages)}
