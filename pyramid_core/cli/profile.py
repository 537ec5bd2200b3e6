"""``pyramid profile``: T(M), the cost of a forward that feeds M tokens, per stage -- the same
measurement (``measure.measure_stage_costs``) the planner and the bench's "predicted" column use."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from pyramid_core import plugins
from pyramid_core.build import make_stage
from pyramid_core.cli.common import compile_arg, int_at_least
from pyramid_core.devices import check_device
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


def run(ns: argparse.Namespace) -> int:
    # lazy: lab/ stays out of CLI start-up
    from pyramid_core.lab.measure import measure_stage_costs
    from pyramid_core.lab.outputs import (  # lazy: lab is kept out of CLI start-up
        json_text,
        md_escape,
    )

    try:
        widths = [int(w) for w in ns.widths.split(",")]
    except ValueError:
        raise ConfigError(f"--widths takes comma-separated integers, got {ns.widths!r}") from None
    if any(m < 1 or m <= before for before, m in zip([0, *widths], widths)):
        raise ConfigError(f"--widths must be strictly increasing integers >= 1 (tokens per forward), got {ns.widths!r}")
    if ns.device:
        check_device(ns.device)
    regs = plugins.registries()
    rows = []
    for spec in ns.stage:
        stage = make_stage(spec, regs=regs, device=ns.device, compile=ns.compile)
        if not isinstance(stage, Stage):
            raise ConfigError(f"--stage {spec!r} is a proposer; `profile` times model stages")
        cost = measure_stage_costs(stage, ns.context, widths, ns.repeats)
        ms = {str(m): 1000 * t for m, t in cost.points}
        first = cost.points[0][1]
        rows.append({"name": stage.name, "spec": spec, "compiled": bool(getattr(stage, "compiled", False)),
                     "ms": ms, "ratio": {str(m): t / first if first > 0 else float("nan") for m, t in cost.points}})
    meta = {"context": ns.context, "repeats": ns.repeats, "threads": torch.get_num_threads(),
            "device": str(ns.device or "default"), "torch": torch.__version__}
    if ns.json:
        print(json_text({"stages": rows, **meta}))
        return 0
    head = "| stage | compiled | " + " | ".join(f"T({m}) ms" for m in widths) + " | " + \
           " | ".join(f"T({m})/T({widths[0]})" for m in widths[1:]) + " |"
    print(head)
    print("|" + "---|" * (2 + 2 * len(widths) - 1))
    for r in rows:
        print(f"| {md_escape(r['spec'])} | {'yes' if r['compiled'] else 'no'} | "
              + " | ".join(f"{r['ms'][str(m)]:.1f}" for m in widths) + " | "
              + " | ".join(f"{r['ratio'][str(m)]:.2f}" for m in widths[1:]) + " |")
    print(f"\nmedian of {ns.repeats} forwards per M after a {ns.context}-token context, {meta['threads']} threads, "
          f"torch {meta['torch']}")
    return 0
