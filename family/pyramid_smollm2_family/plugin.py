"""The ``smollm2-family`` chain, registered through pyramid's ``register_chains`` hook exactly as
any third-party package registers one."""

from __future__ import annotations

from typing import Any

from pyramid_core.hookspecs import hookimpl
from pyramid_core.recipes import Chain

__all__ = ["smollm2_family"]


def smollm2_family() -> Chain:
    """The distilled family, smallest first, with block lengths per boundary (1, 3): the best
    3-stage chain of the planner on the CPU it was developed on, with lengths that never decrease
    upwards (docs/distill.md, "Block lengths of the shipped chain"). `pyramid plan` measures and
    picks them on yours."""
    return Chain("smollm2-family", ("smollm2:stage=draft", "smollm2:stage=qualifier", "smollm2"), (1, 3),
                 "SmolLM2-135M with its distilled draft and qualifier")


@hookimpl
def register_chains(register: Any) -> None:
    register("smollm2-family", smollm2_family,
             "smollm2:stage=draft -> smollm2:stage=qualifier -> smollm2, block lengths 1,3; the default chain",
             default=True)
