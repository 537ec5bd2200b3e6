"""Exceptions raised for bad input. Each message names the stage, plugin or value at fault."""

from __future__ import annotations

__all__ = ["PyramidError", "ConfigError", "PluginError", "TokenizerMismatchError"]


class PyramidError(Exception):
    """Base class of every error pyramid raises on purpose."""


class ConfigError(PyramidError, ValueError):
    """A pipeline, stage, policy or sampling setting is invalid."""


class PluginError(PyramidError, LookupError):
    """A plugin, or a name a plugin registers, is unknown, duplicated or broken."""


class TokenizerMismatchError(ConfigError):
    """Two stages do not share a tokenizer."""
