"""``compile=auto`` on a CPU: each stage runs, per fed length, the execution mode measured fastest
on this machine.

Which kernels win depends on the CPU, the dtype and the number of tokens a forward feeds
(docs/compile.md: oneDNN's pre-packed float32 linears are 1.7x faster than eager at M = 1 on
one CPU and 1.2x slower on another). So ``AUTO`` is not a rule but a measurement: the stage times
each candidate mode (``runtime.measured_candidates``) at every bucket of fed lengths
(``BUCKETS``), interleaved, and keeps the fastest per bucket -- a mode is preferred over eager
only when it beats it by ``MARGIN``, so ``auto`` is never measurably slower than eager. The
compiled mode (a candidate only with ``$PYRAMID_AUTO_COMPILED=1``) keeps the stage's cache static,
so it is chosen for every bucket or for none. A forward
feeding M tokens runs the choice of the smallest bucket >= M (the largest for longer feeds).

The choice is measured once per machine, torch, transformers, model and dtype and kept in a JSON
file (``choice_file``: ``$PYRAMID_MODE_CACHE``, default ``<model home>/modes.json``) under a key
that changes with any of them (``fingerprint``): the CPU's name and instruction sets, the thread
count, the library versions, the model's config, layer count and a checksum of its weights, and
``REVISION`` (this code's).
A file that cannot be read is measured over; one that cannot be written is left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from pyramid_core.backends.hf.files import model_home
from pyramid_core.devices import cpu_name
from pyramid_core.options import ExecutionMode

__all__ = ["BUCKETS", "MARGIN", "CHOICE_ENV", "ModeChoice", "choice_file", "fingerprint", "choose_modes",
           "choice_key", "machine_key"]

BUCKETS = (1, 2, 4, 8, 16)
"""Fed lengths the modes are timed at."""

MARGIN = 0.03
"""A mode other than eager wins a bucket only when it is this much faster (noise never picks it)."""

CHOICE_ENV = "PYRAMID_MODE_CACHE"

REVISION = 2
"""Part of every key: raised whenever a mode's implementation changes what it costs (2: the fast
mode fuses sibling linears), so choices measured on the old code are measured again."""

_REPEATS = 7


@attrs.frozen
class ModeChoice:
    """Per bucket, the mode a stage runs (``modes``) and what each candidate measured
    (``ms[mode][bucket]``, milliseconds, median); ``cached``: read from the choice file."""

    modes: tuple[tuple[int, ExecutionMode], ...]
    ms: dict[str, dict[int, float]] = attrs.field(factory=dict)
    cached: bool = False

    def mode_for(self, m: int) -> ExecutionMode:
        """The mode of a forward feeding ``m`` tokens."""
        for bucket, mode in self.modes:
            if m <= bucket:
                return mode
        return self.modes[-1][1]

    @property
    def distinct(self) -> tuple[ExecutionMode, ...]:
        return tuple(dict.fromkeys(mode for _, mode in self.modes))

    def summary(self) -> str:
        """``"fast"``, or e.g. ``"eager up to M=2, fast above"``, for reprs and tables."""
        runs: list[tuple[ExecutionMode, int]] = []
        for bucket, mode in self.modes:
            if runs and runs[-1][0] is mode:
                runs[-1] = (mode, bucket)
            else:
                runs.append((mode, bucket))
        if len(runs) == 1:
            return runs[0][0].value
        return ", ".join(f"{m.value} up to M={b}" for m, b in runs[:-1]) + f", {runs[-1][0].value} above"

    def to_json(self) -> dict[str, Any]:
        return {"modes": [[b, m.value] for b, m in self.modes],
                "ms": {mode: {str(b): t for b, t in row.items()} for mode, row in self.ms.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModeChoice:
        modes = tuple((int(b), ExecutionMode(m)) for b, m in data["modes"])
        if not modes or any(m is ExecutionMode.AUTO for _, m in modes):
            raise ValueError("a choice holds concrete modes")
        ms = {str(mode): {int(b): float(t) for b, t in row.items()} for mode, row in data.get("ms", {}).items()}
        return cls(modes, ms, cached=True)


def choice_file() -> Path:
    """Where choices are kept (module docstring)."""
    return Path(os.environ.get(CHOICE_ENV) or model_home() / "modes.json").expanduser()


def machine_key() -> dict[str, Any]:
    """What the machine contributes to a fingerprint: CPU, instruction sets, threads, versions."""
    import transformers

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported", "_is_avx512_supported")
    return {"cpu": cpu_name(), "isa": [name for name in probes if getattr(torch.cpu, name, lambda: False)()],
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def _weights_digest(module: Any) -> str:
    """A checksum of every parameter and buffer (their sums and shapes; cheap, and any retraining
    or other checkpoint changes it)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                h.update(f"{name}{tuple(t.shape)}{t.dtype}{float(t.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def fingerprint(model: Any, *, kind: str, dtype: torch.dtype, device: torch.device, layers: int) -> str:
    """The key of one stage's choice (module docstring)."""
    config: Any = getattr(model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    config_text = to_json(use_diff=False) if callable(to_json) else repr(config)
    key = {"machine": machine_key(), "kind": kind, "dtype": str(dtype), "device": str(device), "layers": layers,
           "config": hashlib.sha256(config_text.encode()).hexdigest()[:16], "weights": _weights_digest(model),
           "buckets": list(BUCKETS), "margin": MARGIN, "revision": REVISION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, key: str, choice: ModeChoice) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[key] = choice.to_json()
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the choice is measured again next time


def measure(timer: Callable[[ExecutionMode, int], float], candidates: Sequence[ExecutionMode],
            repeats: int = _REPEATS) -> ModeChoice:
    """Time every candidate at every bucket, interleaved (``timer(mode, m)`` -> seconds of one
    forward feeding ``m`` tokens), and keep the fastest per bucket (module docstring)."""
    samples: dict[ExecutionMode, dict[int, list[float]]] = {c: {b: [] for b in BUCKETS} for c in candidates}
    for c in candidates:  # warm-up: first calls allocate and pick kernels
        for b in BUCKETS:
            timer(c, b)
    for _ in range(repeats):
        for b in BUCKETS:
            for c in candidates:
                samples[c][b].append(timer(c, b))
    ms = {c.value: {b: 1000 * statistics.median(v) for b, v in row.items()} for c, row in samples.items()}
    eager, compiled = ExecutionMode.EAGER, ExecutionMode.COMPILED
    mixable = [c for c in candidates if c is not compiled] or list(candidates)
    modes = []
    for b in BUCKETS:
        best = min(mixable, key=lambda c: ms[c.value][b])
        if eager in mixable and best is not eager and ms[best.value][b] > (1 - MARGIN) * ms[eager.value][b]:
            best = eager
        modes.append((b, best))
    # the compiled mode runs every forward of a stage over its static cache, or none: it wins when it
    # is MARGIN faster summed over the buckets than the best mix of the others
    if (compiled in candidates and compiled not in mixable
            and sum(ms[compiled.value].values()) < (1 - MARGIN) * sum(ms[m.value][b] for b, m in modes)):
        modes = [(b, compiled) for b in BUCKETS]
    return ModeChoice(tuple(modes), ms)


def choice_key(key: str, candidates: Sequence[ExecutionMode]) -> str:
    """Where the choice of ``key`` among ``candidates`` is kept: another set of candidates is
    measured again."""
    return f"{key}:{'+'.join(c.value for c in candidates)}"


def choose_modes(key: str, timer: Callable[[ExecutionMode, int], float],
                 candidates: Sequence[ExecutionMode]) -> ModeChoice:
    """The choice kept under ``key``, or measured now (and kept)."""
    path = choice_file()
    key = choice_key(key, candidates)
    kept = _read(path).get(key)
    if kept is not None:
        try:
            choice = ModeChoice.from_json(kept)
            if set(choice.distinct) <= set(candidates):
                return choice
        except (KeyError, TypeError, ValueError):
            pass
    choice = measure(timer, candidates)
    _write(path, key, choice)
    return choice
