"""Exceptions raised for bad input. Each message names the stage, plugin or value at fault."""

from __future__ import annotations

__all__ = [
    "PyramidError",
    "ConfigError",
    "PluginError",
    "PolicyOutputError",
    "TokenizerMismatchError",
    "StageOutputError",
    "NonFiniteError",
    "NonFiniteWarning",
    "PluginWarning",
]


class PyramidError(Exception):
    """Base class of every error pyramid raises on purpose."""


class ConfigError(PyramidError, ValueError):
    """A pipeline, stage, policy or sampling setting is invalid."""


class PluginError(PyramidError, LookupError):
    """A plugin, or a name a plugin registers, is unknown, duplicated or broken."""


class PolicyOutputError(PluginError):
    """An acceptance policy's ``decide()`` returned a verdict the pipeline cannot use: accepted
    indices that are not a prefix (or a root path of the tree), an emitted token outside the
    vocabulary or without mass in its row, a row of the wrong width.

    ``rule`` names the violated rule of the acceptance-policy contract (``prefix``,
    ``tree-path``, ``token-range``, ``token-mass``, ``row``, ``verdict``) and ``detail`` says
    what was returned and what would be valid, without naming the policy."""

    def __init__(self, message: str, rule: str = "verdict", detail: str = "") -> None:
        super().__init__(message)
        self.rule = rule
        self.detail = detail or message


class TokenizerMismatchError(ConfigError):
    """Two stages do not share a tokenizer."""


class StageOutputError(PyramidError, ValueError):
    """A stage returned rows the pipeline cannot use (the wrong shape, non-finite values)."""


class NonFiniteError(StageOutputError, ArithmeticError):
    """A stage returned NaN or +inf logits, or a row without any finite logit."""


class NonFiniteWarning(RuntimeWarning):
    """A stage returned non-finite logits and the pipeline dropped them (``on_nonfinite="warn"``)."""


class PluginWarning(UserWarning):
    """A plugin setting that does nothing (e.g. ``PYRAMID_CORE_DISABLE_PLUGINS`` naming no
    installed plugin)."""
