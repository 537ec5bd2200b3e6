"""``pyramid profile``: T(M), the cost of a forward that feeds M tokens, per stage -- the same
measurement (``measure.measure_stage_costs``) the planner and the bench's "predicted" column use."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from pyramid_core import plugins
from pyramid_core.build import make_stage
from pyramid_core.cli.common import compile_arg, int_at_least
from pyramid_core.cli.config import run_arguments
from pyramid_core.devices import check_device, cpu_name
from pyramid_core.errors import ConfigError
from pyramid_core.protocols import Stage

__all__ = ["configure"]


def configure(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument("--stage", action="append", metavar="STAGE", required=True,
                   help="a model stage, repeated (e.g. --stage smollm2:compile=false --stage smollm2:compile=true)")
    p.add_argument("--widths", default="1,2,4,8,16", metavar="M1,M2,...",
                   help="tokens per forward M to time, increasing (default 1,2,4,8,16)")
    p.add_argument("--context", type=int_at_least(1), default=200, help="tokens already in the cache (default 200); with the rounds and the widest M it must fit "
                        "the stage's context length")
    p.add_argument("--repeats", type=int_at_least(1), default=10,
                   help="timed forwards per M, interleaved; the median is kept")
    p.add_argument("--device", help="device for the model backends (cpu, cuda, ...)")
    compile_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return run


def _variants(spec: str, stage: Stage, ns: argparse.Namespace, regs: plugins.Registries) -> list[tuple[str, Stage]]:
    """The stage as built, then -- where ``compile=auto`` measured a choice between modes -- the
    same stage in each candidate mode (sharing its weights), so every mode is timed side by side."""
    from pyramid_core.options import ExecutionMode

    choice = getattr(stage, "choice", None)
    mode = getattr(stage, "mode", None)
    chosen = f"auto: {choice.summary()}" if choice is not None else str(getattr(mode, "value", "-"))
    out = [(chosen, stage)]
    if choice is not None:
        for name in choice.ms:
            explicit = make_stage(spec, regs=regs, device=ns.device, compile=ExecutionMode(name), dtype=ns.dtype)
            if isinstance(explicit, Stage):
                out.append((name, explicit))
    return out


def _floor_bytes(stage: Stage) -> int | None:
    """Weight bytes one decode forward of ``stage`` reads (HF model stages: the layers it runs and
    its LM head; feature heads: the head and the LM head it uses; ``None`` for other stages)."""
    from pyramid_core.backends.hf.head_stage import FeatureStage
    from pyramid_core.backends.hf.layers import forward_weight_bytes, unique_bytes
    from pyramid_core.backends.hf.stage import HFStage

    if isinstance(stage, HFStage):
        return forward_weight_bytes(stage.model, stage.num_layers)
    if isinstance(stage, FeatureStage):
        head = stage.head
        return unique_bytes([*head.parameters(), *head.buffers(), *head.head_module().parameters()])
    return None


def run(ns: argparse.Namespace) -> int:
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.measure import measure_bandwidth, measure_stage_costs
    from pyramid_core.lab.outputs import (  # lazy: lab is kept out of CLI start-up
        json_text,
        md_escape,
    )
    from pyramid_core.lab.provenance import run_record

    arguments = run_arguments(ns)

    try:
        widths = [int(w) for w in ns.widths.split(",")]
    except ValueError:
        raise ConfigError(f"--widths takes comma-separated integers, got {ns.widths!r}") from None
    if any(m < 1 or m <= before for before, m in zip([0, *widths], widths)):
        raise ConfigError(f"--widths must be strictly increasing integers >= 1 (tokens per forward), got {ns.widths!r}")
    if ns.device:
        check_device(ns.device)
    regs = plugins.registries()
    bandwidth = measure_bandwidth(device=ns.device or "cpu")
    rows = []
    loaded = []
    for spec in ns.stage:
        stage = make_stage(spec, regs=regs, device=ns.device, compile=ns.compile, dtype=ns.dtype)
        if not isinstance(stage, Stage):
            raise ConfigError(f"--stage {spec!r} is a proposer; `profile` times model stages")
        loaded.append(stage)
        weights = _floor_bytes(stage)
        floor = weights / bandwidth if weights is not None else None
        for mode, variant in _variants(spec, stage, ns, regs):
            cost = measure_stage_costs(variant, ns.context, widths, ns.repeats)
            ms = {str(m): 1000 * t for m, t in cost.points}
            first = cost.points[0][1]
            rows.append({"name": stage.name, "spec": spec, "mode": mode,
                         "dtype": str(getattr(stage, "dtype", "-")).removeprefix("torch."),
                         "compiled": bool(getattr(variant, "compiled", False)), "ms": ms,
                         "ratio": {str(m): t / first if first > 0 else float("nan") for m, t in cost.points},
                         "weight_bytes": weights, "floor_ms": None if floor is None else 1000 * floor,
                         "over_floor": None if floor is None else first / floor})
    meta = {"context": ns.context, "repeats": ns.repeats, "threads": torch.get_num_threads(),
            "device": str(ns.device or "default"), "torch": torch.__version__, "cpu": cpu_name(),
            "bandwidth_gb_s": bandwidth / 1e9}
    if ns.json:
        print(json_text({"stages": rows, **meta, "run": run_record("pyramid profile", arguments, loaded)}))
        return 0
    head = "| stage | mode | dtype | " + " | ".join(f"T({m}) ms" for m in widths) + " | " + \
           " | ".join(f"T({m})/T({widths[0]})" for m in widths[1:]) + f" | floor ms | T({widths[0]})/floor |"
    print(head)
    print("|" + "---|" * (3 + 2 * len(widths) - 1 + 2))
    for r in rows:
        floor_cells = ("- | -" if r["floor_ms"] is None else f"{r['floor_ms']:.1f} | {r['over_floor']:.2f}")
        print(f"| {md_escape(r['spec'])} | {md_escape(r['mode'])} | {r['dtype']} | "
              + " | ".join(f"{r['ms'][str(m)]:.1f}" for m in widths) + " | "
              + " | ".join(f"{r['ratio'][str(m)]:.2f}" for m in widths[1:]) + f" | {floor_cells} |")
    print(f"\nmedian of {ns.repeats} forwards per M after a {ns.context}-token context, {meta['threads']} threads, "
          f"torch {meta['torch']}, CPU {cpu_name()}. The first row of a stage is its mode as built (auto: the "
          "choice measured per fed length, kept in the mode cache); the rows after it time each candidate mode. "
          f"floor: the weight bytes one decode forward reads over this machine's memory bandwidth, measured in "
          f"this run ({meta['bandwidth_gb_s']:.1f} GB/s: a sum over a 512 MiB tensor).")
    return 0
