"""Built-in presets ([PyramidSD](../../algorithms.md#pyramidsd), arXiv 2510.12966; FSD, arXiv
2502.20704).

- ``sd``    exact rejection sampling at every boundary, any number of stages (lossless).
- ``fsd``   two stages, fuzzy JS acceptance with tau 0.4.
- ``psd-a`` three stages: ``assisted`` at draft -> qualifier (lossless w.r.t. the qualifier),
            fuzzy JS tau_T 0.5 at qualifier -> target; l_D 15, l_Q 25.
- ``psd-f`` three stages: fuzzy JS at both boundaries, tau_Q 0.4 and tau_T 0.5, l_D 15, l_Q 25
            (the PyramidSD paper's defaults).
Block lengths are per boundary, smallest first: (l_D, l_Q). ``--length`` overrides them.
"""

from __future__ import annotations

from typing import Any

from pyramid_core.hookspecs import hookimpl
from pyramid_core.recipes import Preset

TAU_Q, TAU_T, ELL_D, ELL_Q = 0.4, 0.5, 15, 25


def _need(name: str, n_stages: int, expected: int) -> None:
    if n_stages != expected:
        raise ValueError(f"preset {name!r} is for {expected} stages, got {n_stages}")


def sd(n_stages: int) -> Preset:
    if n_stages < 2:
        raise ValueError(f"preset 'sd' needs at least 2 stages, got {n_stages}")
    return Preset("sd", ("exact",) * (n_stages - 1), tuple(4 * 2**k for k in range(n_stages - 1)),
                  "exact rejection sampling at every boundary")


def fsd(n_stages: int) -> Preset:
    _need("fsd", n_stages, 2)
    return Preset("fsd", (f"fuzzy:div=js,tau={TAU_Q}",), (8,), "fuzzy speculative decoding")


def psd_a(n_stages: int) -> Preset:
    _need("psd-a", n_stages, 3)
    return Preset("psd-a", ("assisted", f"fuzzy:div=js,tau={TAU_T}"), (ELL_D, ELL_Q),
                  "PyramidSD assisted: qualifier quality floor, fuzzy at the target")


def psd_f(n_stages: int) -> Preset:
    _need("psd-f", n_stages, 3)
    return Preset("psd-f", (f"fuzzy:div=js,tau={TAU_Q}", f"fuzzy:div=js,tau={TAU_T}"), (ELL_D, ELL_Q),
                  "PyramidSD fuzzy at both boundaries")


@hookimpl
def register_presets(register: Any) -> None:
    register("sd", sd, "exact at every boundary (any N >= 2); block lengths 4, 8, 16, ...")
    register("fsd", fsd, "2 stages: fuzzy JS tau 0.4, block 8")
    register("psd-a", psd_a, "3 stages: assisted, then fuzzy JS tau_T 0.5; blocks l_D 15, l_Q 25")
    register("psd-f", psd_f, "3 stages: fuzzy JS tau_Q 0.4 and tau_T 0.5; blocks l_D 15, l_Q 25")
