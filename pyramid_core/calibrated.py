"""Budgeted presets: a lossy preset whose thresholds and block lengths the quality-budget planner
set for the stages at hand (docs/algorithms.md, "Budgeted presets").

``preset="psd-f:budget=0.05"`` names the preset ``psd-f`` run at the fastest thresholds whose
measured price (excess NLL under the target, nats/token) was within 0.05 for *these* stages and
*this* sampler. The planner (``pyramid plan --quality-budget 0.05 --preset psd-f``, or
``pyramid_core.lab.budget.calibrate_preset``) measures the preset's thresholds and block lengths
and records its choice here; resolving the spec reads the record and measures nothing. A spec
without a record is an error that says how to make one: the price of a threshold depends on the
stages and the sampler, so a budget cannot be met by thresholds measured for other ones.

The records live in one JSON file, ``$PYRAMID_BUDGETS`` (default ``$PYRAMID_HOME/budgets.json``,
``~/.cache/pyramid/budgets.json``), keyed by the preset, the stage specs as written (smallest
first, the target last), the budget and the sampler.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from pyramid_core.errors import ConfigError
from pyramid_core.registry import parse_spec
from pyramid_core.types import SamplingConfig

__all__ = ["STORE_ENV", "store_path", "parse_budgeted", "BudgetKey", "BudgetRecord", "lookup", "save", "require",
           "calibrate_command"]

STORE_ENV = "PYRAMID_BUDGETS"
_FORMAT = 1


def store_path() -> Path:
    """``$PYRAMID_BUDGETS``, default ``$PYRAMID_HOME/budgets.json`` (``~/.cache/pyramid``)."""
    explicit = os.environ.get(STORE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("PYRAMID_HOME") or "~/.cache/pyramid").expanduser() / "budgets.json"


def parse_budgeted(spec: str) -> tuple[str, float | None]:
    """``"psd-f:budget=0.05"`` -> ``("psd-f", 0.05)``; ``"psd-f"`` -> ``("psd-f", None)``. A preset
    takes no parameter but ``budget`` (nats/token, finite, >= 0)."""
    name, params = parse_spec(spec)
    unknown = sorted(set(params) - {"budget"})
    if unknown:
        raise ConfigError(f"preset {spec!r}: unknown parameter {unknown[0]!r}; a preset takes only budget=NATS "
                          "(e.g. psd-f:budget=0.05)")
    if "budget" not in params:
        return name, None
    try:
        budget = float(params["budget"])
    except ValueError:
        raise ConfigError(f"preset {spec!r}: budget={params['budget']!r} is not a number of nats/token") from None
    if not (math.isfinite(budget) and budget >= 0):
        raise ConfigError(f"preset {spec!r}: the budget is an excess NLL in nats/token, finite and >= 0")
    return name, budget


def _strs(value: Iterable[Any]) -> tuple[str, ...]:
    return tuple(str(v) for v in value)


def _ints(value: Iterable[Any]) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


def _floats(value: Iterable[Any]) -> tuple[float, ...]:
    return tuple(float(v) for v in value)


def _sampling_text(s: SamplingConfig) -> str:
    return f"temperature={s.temperature:g},top_k={s.top_k},top_p={s.top_p:g}"


@attrs.frozen
class BudgetKey:
    """What a record is for: the preset's name, the stage specs (smallest first, the target
    last), the budget and the sampler."""

    preset: str
    stages: tuple[str, ...] = attrs.field(converter=_strs)
    budget: float = attrs.field(converter=float)
    sampling: SamplingConfig = attrs.field(factory=SamplingConfig)

    @property
    def text(self) -> str:
        return f"{self.preset}:budget={self.budget:g} | {' -> '.join(self.stages)} | {_sampling_text(self.sampling)}"


@attrs.frozen
class BudgetRecord:
    """The planner's choice for ``key``: a policy spec and a block length per boundary, the fuzzy
    thresholds, and what it measured -- tokens/s and the price (mean and 95% half-width) on the
    tuning prompts, the price on the held-out ones -- with when and how."""

    key: BudgetKey
    policies: tuple[str, ...] = attrs.field(converter=_strs)
    block_lengths: tuple[int, ...] = attrs.field(converter=_ints)
    thresholds: tuple[float, ...] = attrs.field(converter=_floats)
    tokens_per_s: float
    price: tuple[float, ...] = attrs.field(converter=_floats)
    heldout_price: tuple[float, ...] = attrs.field(converter=_floats)
    measured: str = ""
    command: str = ""

    def as_dict(self) -> dict[str, Any]:
        k = self.key
        return {"preset": k.preset, "stages": list(k.stages), "budget": k.budget, "sampling": attrs.asdict(k.sampling),
                "policies": list(self.policies), "block_lengths": list(self.block_lengths),
                "thresholds": list(self.thresholds), "tokens_per_s": self.tokens_per_s, "price": list(self.price),
                "heldout_price": list(self.heldout_price), "measured": self.measured, "command": self.command}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BudgetRecord:
        key = BudgetKey(d["preset"], d["stages"], d["budget"], SamplingConfig(**d["sampling"]))
        return cls(key, d["policies"], d["block_lengths"], d["thresholds"], float(d["tokens_per_s"]),
                   d["price"], d["heldout_price"], str(d.get("measured", "")), str(d.get("command", "")))


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"the budgeted-preset records {path} cannot be read ({exc}); remove the file or point "
                          f"${STORE_ENV} elsewhere and calibrate again") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("records"), dict):
        raise ConfigError(f"{path} is not a budgeted-preset record file of format {_FORMAT}; remove it or point "
                          f"${STORE_ENV} elsewhere")
    return dict(data["records"])


def lookup(key: BudgetKey, path: Path | None = None) -> BudgetRecord | None:
    """The record for ``key``, or ``None``."""
    raw = _read(path or store_path()).get(key.text)
    return None if raw is None else BudgetRecord.from_dict(raw)


def save(record: BudgetRecord, path: Path | None = None) -> Path:
    """Record (or replace) ``record``; the file is rewritten atomically. Returns its path."""
    path = path or store_path()
    records = _read(path)
    records[record.key.text] = record.as_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".budgets.", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"format": _FORMAT, "records": records}, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def calibrate_command(key: BudgetKey) -> str:
    """The ``pyramid plan`` line that makes the record for ``key``."""
    s = key.sampling
    stages = " ".join(f"--stage {spec}" for spec in key.stages)
    extra = (f" --top-k {s.top_k}" if s.top_k else "") + (f" --top-p {s.top_p:g}" if s.top_p < 1 else "")
    return (f"pyramid plan --quality-budget {key.budget:g} --preset {key.preset} {stages} "
            f"--temperature {s.temperature:g}{extra}")


def require(preset: str, budget: float, stages: Sequence[object], sampling: SamplingConfig,
            path: Path | None = None) -> BudgetRecord:
    """The record of ``preset`` at ``budget`` for ``stages`` (specs) and ``sampling``; a
    ``ConfigError`` saying how to calibrate it when there is none."""
    loaded = [s for s in stages if not isinstance(s, str)]
    if loaded:
        raise ConfigError(f"preset {preset}:budget={budget:g} is looked up by the stages' specs, and "
                          f"{getattr(loaded[0], 'name', loaded[0])!r} is a loaded stage: give the stages as specs "
                          "(e.g. 'smollm2:stage=draft'), or the calibrated policies and block lengths themselves")
    key = BudgetKey(preset, tuple(str(s) for s in stages), budget, sampling)
    path = path or store_path()
    rec = lookup(key, path)
    if rec is None:
        raise ConfigError(f"preset {preset}:budget={budget:g} has not been calibrated for {' -> '.join(key.stages)} "
                          f"at {_sampling_text(sampling)} (records: {path}). Its thresholds are measured for the stages "
                          f"and sampler at hand (minutes): {calibrate_command(key)} -- or in Python "
                          "pyramid_core.lab.budget.calibrate_preset(...)")
    return rec
