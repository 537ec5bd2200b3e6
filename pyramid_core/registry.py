"""Name -> factory registries filled by plugins, with "did you mean" errors.

A spec string names a registered factory and, optionally, its parameters by name:
``"fuzzy:div=js,tau=0.3"``. Values are converted with the factory's annotations
(int, float, bool, str).
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import attrs

from pyramid_core.errors import ConfigError, PluginError

__all__ = ["Registration", "Registry", "parse_spec"]

T = TypeVar("T")


@attrs.frozen
class Registration(Generic[T]):
    name: str
    factory: Callable[..., T]
    plugin: str
    description: str = ""


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"name:k=v,k2=v2"`` -> ``("name", {"k": "v", "k2": "v2"})``."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"empty name in spec {spec!r}; expected NAME or NAME:key=value,...")
    params: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"{name!r}: parameter {item!r} is not of the form key=value (in {spec!r})")
            params[key.strip()] = value.strip()
    return name, params


def _convert(kind: str, name: str, param: str, value: Any, annotation: Any) -> Any:
    if not isinstance(value, str):
        return value
    targets = typing.get_args(annotation) or (annotation,)
    for target in targets:
        try:
            if target is bool:
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                continue
            if target in (int, float):
                return target(value)
            if target is str:
                return value
        except ValueError:
            continue
    raise ConfigError(f"{kind} {name!r}: parameter {param}={value!r} is not a valid {annotation}")


def _hints(factory: Callable[..., Any]) -> dict[str, Any]:
    """Parameter annotations of a function, or of a class's ``__init__``."""
    target = factory.__init__ if isinstance(factory, type) else factory  # type: ignore[misc]
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: values are passed as given
        return {}


class Registry(Generic[T]):
    """Registered factories of one kind ("policy", "proposer", "backend")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Registration[T]] = {}

    def register(self, name: str, factory: Callable[..., T], *, plugin: str, description: str = "") -> None:
        if not isinstance(name, str) or not name or ":" in name or "," in name:
            raise PluginError(f"plugin {plugin!r} registered an invalid {self.kind} name {name!r}")
        if not callable(factory):
            raise PluginError(f"plugin {plugin!r} registered {self.kind} {name!r} with a non-callable factory")
        if name in self._entries:
            other = self._entries[name].plugin
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by plugin {other!r} and by plugin {plugin!r}; "
                f"disable one of them (PYRAMID_CORE_DISABLE_PLUGINS={plugin})"
            )
        self._entries[name] = Registration(name, factory, plugin, description)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Registration[T]]:
        return iter(sorted(self._entries.values(), key=lambda r: r.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Registration[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise PluginError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (available: {', '.join(self.names()) or 'none'})"

    def create(self, spec: str, **overrides: Any) -> T:
        """Build an instance from ``"name:k=v,..."``; keyword overrides win over the spec's."""
        name, params = parse_spec(spec)
        reg = self.get(name)
        merged: dict[str, Any] = {**params, **overrides}
        sig = inspect.signature(reg.factory)
        hints = _hints(reg.factory)
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        valid = [p for p in sig.parameters if sig.parameters[p].kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        kwargs: dict[str, Any] = {}
        for key, value in merged.items():
            if key not in valid and not accepts_any:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"{self.kind} {name!r} has no parameter {key!r}{hint} "
                    f"(parameters: {', '.join(valid) or 'none'})"
                )
            kwargs[key] = _convert(self.kind, name, key, value, hints.get(key, str))
        try:
            return reg.factory(**kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{self.kind} {name!r} (from plugin {reg.plugin!r}): {exc}") from exc

    def describe(self) -> Mapping[str, Registration[T]]:
        return dict(self._entries)
