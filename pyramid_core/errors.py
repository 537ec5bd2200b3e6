"""Exceptions raised for bad input. Each message names the stage, plugin or value at fault."""

from __future__ import annotations

__all__ = [
    "PyramidError",
    "ConfigError",
    "PluginError",
    "TokenizerMismatchError",
    "StageOutputError",
    "NonFiniteError",
    "NonFiniteWarning",
]


class PyramidError(Exception):
    """Base class of every error pyramid raises on purpose."""


class ConfigError(PyramidError, ValueError):
    """A pipeline, stage, policy or sampling setting is invalid."""


class PluginError(PyramidError, LookupError):
    """A plugin, or a name a plugin registers, is unknown, duplicated or broken."""


class TokenizerMismatchError(ConfigError):
    """Two stages do not share a tokenizer."""


class StageOutputError(PyramidError, ValueError):
    """A stage returned rows the pipeline cannot use (the wrong shape, non-finite values)."""


class NonFiniteError(StageOutputError, ArithmeticError):
    """A stage returned NaN or +inf logits, or a row without any finite logit."""


class NonFiniteWarning(RuntimeWarning):
    """A stage returned non-finite logits and the pipeline dropped them (``on_nonfinite="warn"``)."""
