"""Presets and chains: named recipes registered by plugins.

- ``Preset`` (hook ``register_presets``): policies and block lengths, one per boundary, for a
  given number of stages (the built-ins live in ``pyramid_plugins.presets``).
- ``Chain`` (hook ``register_chains``): stage specs, smallest first, and a block length per
  boundary -- what the commands run when no ``--stage`` is given (``smollm2-family``).
"""

from __future__ import annotations

import attrs

from pyramid_core.errors import ConfigError

__all__ = ["Preset", "Chain"]


@attrs.frozen
class Preset:
    """Policy specs and block lengths for each boundary k -> k+1, smallest first."""

    name: str
    policies: tuple[str, ...]
    block_lengths: tuple[int, ...]
    description: str = ""

    def __attrs_post_init__(self) -> None:
        if len(self.policies) != len(self.block_lengths):
            raise ConfigError(
                f"preset {self.name!r}: {len(self.policies)} policies but {len(self.block_lengths)} block lengths"
            )


@attrs.frozen
class Chain:
    """Stage specs (smallest first, the target last) and a block length per boundary."""

    name: str
    stages: tuple[str, ...]
    block_lengths: tuple[int, ...]
    description: str = ""

    def __attrs_post_init__(self) -> None:
        if not self.stages:
            raise ConfigError(f"chain {self.name!r} has no stages")
        if len(self.block_lengths) != len(self.stages) - 1:
            raise ConfigError(
                f"chain {self.name!r}: {len(self.stages)} stages need {len(self.stages) - 1} block lengths, "
                f"got {len(self.block_lengths)}"
            )
