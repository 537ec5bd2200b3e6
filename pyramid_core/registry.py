"""Name -> factory registries filled by plugins, with "did you mean" errors.

A spec string names a registered factory and, optionally, its parameters by name:
``"fuzzy:div=js,tau=0.3"``. Values are converted with the factory's annotations (int, float,
bool, str, or a type with a ``parse`` classmethod such as ``ExecutionMode``). A parameter annotated with a registered kind -- ``AcceptancePolicy``,
``Divergence``, ... (``Registry.nested``) -- takes a spec of that kind, resolved by the
registry of that kind: ``assisted:inner=exact``, or with parameters of its own in parentheses,
``assisted:inner=(fuzzy:div=tv,tau=0.3)``.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import attrs

from pyramid_core.errors import ConfigError, PluginError

__all__ = ["Registration", "Registry", "parse_spec", "format_spec", "split_top"]

T = TypeVar("T")

Nested = dict[Any, Callable[[str], Any]]
"""Annotation (a protocol class) -> how a spec string of that kind becomes a value."""


@attrs.frozen
class Registration(Generic[T]):
    name: str
    factory: Callable[..., T]
    plugin: str
    description: str = ""


def split_top(text: str, sep: str = ",", spec: str | None = None) -> list[str]:
    """``text`` split at ``sep`` outside parentheses (``spec`` names the whole in errors)."""
    spec = text if spec is None else spec
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"unbalanced ')' in spec {spec!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"unbalanced '(' in spec {spec!r}")
    parts.append(text[start:])
    return parts


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"name:k=v,k2=(n:a=1,b=2)"`` -> ``("name", {"k": "v", "k2": "n:a=1,b=2"})``: a value in
    parentheses is a nested spec and may hold commas."""
    if not isinstance(spec, str):
        raise ConfigError(f"a spec must be a string like NAME or NAME:key=value,..., got {spec!r}")
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"empty name in spec {spec!r}; expected NAME or NAME:key=value,...")
    if "(" in name or ")" in name:
        raise ConfigError(f"invalid name {name!r} in spec {spec!r}; expected NAME or NAME:key=value,...")
    params: dict[str, str] = {}
    if rest.strip():
        for item in split_top(rest, ",", spec):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"{name!r}: parameter {item!r} is not of the form key=value (in {spec!r})")
            value = value.strip()
            if value.startswith("(") and value.endswith(")"):
                value = value[1:-1].strip()
            if key.strip() in params:
                raise ConfigError(f"{name!r}: parameter {key.strip()!r} is given twice (in {spec!r})")
            params[key.strip()] = value
    return name, params


def format_spec(name: str, params: Mapping[str, Any]) -> str:
    """The inverse of ``parse_spec``: nested specs with parameters go in parentheses."""
    if not params:
        return name
    items = []
    for key, value in params.items():
        text = str(value)
        items.append(f"{key}=({text})" if ":" in text and "," in text else f"{key}={text}")
    return name + ":" + ",".join(items)


def _convert(kind: str, name: str, param: str, value: Any, annotation: Any, nested: Nested) -> Any:
    if not isinstance(value, str):
        return value
    targets = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    if type(None) in targets and value.lower() in ("", "none"):
        return None
    for target in targets:
        if target in nested:  # a spec of another registered kind, resolved by its registry
            try:
                return nested[target](value)
            except (ConfigError, PluginError) as exc:
                raise ConfigError(f"{kind} {name!r}: parameter {param}={value!r}: {exc}") from None
    for target in targets:  # an option type that parses its own words (e.g. ``ExecutionMode``)
        parse = getattr(target, "parse", None) if isinstance(target, type) and target not in (bool, int, float, str) \
            else None
        if callable(parse):
            try:
                return parse(value)
            except ConfigError as exc:
                raise ConfigError(f"{kind} {name!r}: {exc}") from None
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
    """Registered factories of one kind ("policy", "proposer", "backend", ...).

    ``nested`` is shared by the registries of one ``Registries``: it maps the protocol classes
    of the registered kinds to their resolvers, so a parameter annotated with one of them takes
    a spec string of that kind. ``default`` is the name a plugin registered with
    ``default=True`` (``None`` if none did)."""

    def __init__(self, kind: str, nested: Nested | None = None) -> None:
        self.kind = kind
        self.nested: Nested = nested if nested is not None else {}
        self._entries: dict[str, Registration[T]] = {}
        self._default: Registration[T] | None = None

    def register(self, name: str, factory: Callable[..., T], *, plugin: str, description: str = "",
                 default: bool = False) -> None:
        if not isinstance(name, str) or not name or any(c in name for c in ":,()="):
            raise PluginError(f"plugin {plugin!r} registered an invalid {self.kind} name {name!r} "
                              "(a name may not contain ':', ',', '=' or parentheses)")
        if not callable(factory):
            raise PluginError(f"plugin {plugin!r} registered {self.kind} {name!r} with a non-callable factory")
        if name in self._entries:
            other = self._entries[name].plugin
            raise PluginError(
                f"{self.kind} {name!r} is registered twice: by plugin {other!r} and by plugin {plugin!r}. "
                f"Neither wins: disable the one you do not want with PYRAMID_CORE_DISABLE_PLUGINS={other} "
                f"(the other keeps the name) or PYRAMID_CORE_DISABLE_PLUGINS={plugin}"
            )
        reg = Registration(name, factory, plugin, description)
        if default:
            if self._default is not None:
                raise PluginError(
                    f"two plugins declare a default {self.kind}: {self._default.name!r} (plugin "
                    f"{self._default.plugin!r}) and {name!r} (plugin {plugin!r}); disable one of them with "
                    f"PYRAMID_CORE_DISABLE_PLUGINS"
                )
            self._default = reg
        self._entries[name] = reg

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Registration[T]]:
        return iter(sorted(self._entries.values(), key=lambda r: r.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    @property
    def default(self) -> Registration[T] | None:
        return self._default

    def default_name(self, purpose: str) -> str:
        """The default's name; a ``PluginError`` saying what is missing, and for what, if no
        plugin declared one (e.g. the plugin that does is disabled)."""
        if self._default is None:
            raise PluginError(
                f"no default {self.kind}: {purpose}, but no loaded plugin declares a default {self.kind} "
                f"(is the plugin that does disabled by PYRAMID_CORE_DISABLE_PLUGINS?). Registered: "
                f"{', '.join(self.names()) or 'none'}; name one explicitly"
            )
        return self._default.name

    def get(self, name: str) -> Registration[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise PluginError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (available: {', '.join(self.names()) or 'none'})"

    def parameters(self, name: str) -> list[str]:
        """The keyword parameters a spec of ``name`` may set."""
        sig = inspect.signature(self.get(name).factory)
        return [p for p, v in sig.parameters.items()
                if v.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]

    def accepts(self, name: str, param: str) -> bool:
        """Whether factory ``name`` takes keyword ``param`` (or any keyword)."""
        sig = inspect.signature(self.get(name).factory)
        return param in sig.parameters or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())

    def create(self, spec: str, **overrides: Any) -> T:
        """Build an instance from ``"name:k=v,..."``; keyword overrides win over the spec's."""
        name, params = parse_spec(spec)
        reg = self.get(name)
        merged: dict[str, Any] = {**params, **overrides}
        sig = inspect.signature(reg.factory)
        hints = _hints(reg.factory)
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        valid = self.parameters(name)
        kwargs: dict[str, Any] = {}
        for key, value in merged.items():
            if key not in valid and not accepts_any:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                nested = [p for p in valid if any(t in self.nested for t in _annotation_types(hints.get(p)))]
                if nested:  # likely `inner=fuzzy:div=tv,tau=0.3`, split at its comma
                    hint += (f"; a nested spec with several parameters goes in parentheses, "
                             f"e.g. {nested[0]}=(NAME:a=1,b=2)")
                raise ConfigError(
                    f"{self.kind} {name!r} has no parameter {key!r}{hint} "
                    f"(parameters: {', '.join(valid) or 'none'})"
                )
            kwargs[key] = _convert(self.kind, name, key, value, hints.get(key, str), self.nested)
        try:
            return reg.factory(**kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{self.kind} {name!r} (from plugin {reg.plugin!r}): {exc}") from exc

    def describe(self) -> Mapping[str, Registration[T]]:
        return dict(self._entries)


def _annotation_types(annotation: Any) -> tuple[Any, ...]:
    if annotation is None:
        return ()
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)
