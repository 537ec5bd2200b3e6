"""Presets: named recipes of acceptance policies and block lengths, one per boundary.

Presets are registered by plugins (hook ``register_presets``); the built-ins live in
``pyramid_plugins.presets``.
"""

from __future__ import annotations

import attrs

from pyramid_core.errors import ConfigError

__all__ = ["Preset"]


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
