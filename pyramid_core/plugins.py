"""The plugin manager: entry points of group ``pyramid_core`` fill the registries.

Built-in plugins (``pyramid_plugins.*``) are registered through the same entry-point group as
third-party ones. ``PYRAMID_CORE_DISABLE_PLUGINS=name1,name2`` blocks plugins by entry-point name.

``registries()`` is the cached set for the installed plugins -- called once at the top of a
command or of ``PipelineSpec.resolve`` and passed down from there, never from inside a plugin;
``registries_with(plugin, ...)`` builds a separate set with extra plugin objects (tests,
notebooks).
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import attrs
import pluggy

from pyramid_core import hookspecs
from pyramid_core.errors import PluginError, PluginWarning
from pyramid_core.protocols import AcceptancePolicy, Divergence, Proposer, Stage
from pyramid_core.recipes import Chain, Preset
from pyramid_core.registry import Nested, Registry

log = logging.getLogger(__name__)

__all__ = ["Registries", "PluginInfo", "plugin_manager", "registries", "registries_with", "reload_plugins",
           "DISABLE_ENV"]

DISABLE_ENV = "PYRAMID_CORE_DISABLE_PLUGINS"


@attrs.frozen
class PluginInfo:
    name: str
    package: str
    version: str
    registered: tuple[tuple[str, str], ...]  # (kind, name)


@attrs.frozen
class Registries:
    """Every registry of one plugin manager. ``nested`` maps the protocol classes of the
    registered kinds to resolvers, so a factory parameter annotated ``AcceptancePolicy`` or
    ``Divergence`` takes a spec of that kind, resolved here (``Registry.create``)."""

    policies: Registry[AcceptancePolicy]
    proposers: Registry[Proposer]
    backends: Registry[Stage]
    wrappers: Registry[Proposer]
    divergences: Registry[Divergence]
    presets: Registry[Preset]
    chains: Registry[Chain]
    commands: Registry[Any]
    plugins: tuple[PluginInfo, ...]

    def by_kind(self) -> dict[str, Registry[Any]]:
        """``{"policy": policies, ...}`` in the order ``pyramid plugins`` lists them."""
        regs: list[Registry[Any]] = [self.policies, self.proposers, self.backends, self.wrappers,
                                     self.divergences, self.presets, self.chains, self.commands]
        return {r.kind: r for r in regs}


HOOKS = {  # registry kind -> hook
    "policy": "register_policies",
    "proposer": "register_proposers",
    "backend": "register_backends",
    "wrapper": "register_wrappers",
    "divergence": "register_divergences",
    "preset": "register_presets",
    "chain": "register_chains",
    "command": "register_commands",
}


def _blocked() -> set[str]:
    return set(filter(None, (n.strip() for n in os.environ.get(DISABLE_ENV, "").split(","))))


def _new_manager(extra: tuple[object, ...] = ()) -> tuple[pluggy.PluginManager, dict[str, tuple[str, str]]]:
    """A manager with every entry point of the group that is not blocked (each loaded on its
    own, so a broken one is named), then ``extra``; and ``{plugin name: (package, version)}``."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = _blocked()
    for name in blocked:
        pm.set_blocked(name)
    dists: dict[str, tuple[str, str]] = {}
    seen: dict[str, str] = {}
    points = importlib.metadata.entry_points(group=hookspecs.PROJECT)
    known = sorted({ep.name for ep in points})
    for name in sorted(blocked - set(known)):
        warnings.warn(f"{DISABLE_ENV} names {name!r}, but no installed plugin has that name, so it disables "
                      f"nothing; installed plugins: {', '.join(known) or 'none'}", PluginWarning, stacklevel=2)
    for ep in points:
        if ep.name in blocked:
            continue
        dist = ep.dist.metadata["Name"] if ep.dist is not None else "?"
        if ep.name in seen:
            if seen[ep.name] == dist:  # the same distribution found twice on sys.path
                continue
            raise PluginError(
                f"two packages expose a pyramid_core plugin named {ep.name!r}: {seen[ep.name]} and {dist}; "
                f"uninstall one of them"
            )
        seen[ep.name] = dist
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must say which one it is
            raise PluginError(
                f"plugin {ep.name!r} ({ep.value}, from package {dist}) failed to load: {type(exc).__name__}: {exc}; "
                f"fix or uninstall it, or disable it with {DISABLE_ENV}={ep.name}"
            ) from exc
        pm.register(plugin, name=ep.name)
        dists[ep.name] = (dist, ep.dist.version if ep.dist is not None else "")
    for plugin in extra:
        pm.register(plugin)
    return pm, dists


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    return _managed()[0]


@functools.cache
def _managed() -> tuple[pluggy.PluginManager, dict[str, tuple[str, str]]]:
    return _new_manager()


def _collect(pm: pluggy.PluginManager, dists: dict[str, tuple[str, str]]) -> Registries:
    nested: Nested = {}
    regs: dict[str, Registry[Any]] = {kind: Registry(kind, nested) for kind in HOOKS}
    nested[AcceptancePolicy] = regs["policy"].create
    nested[Divergence] = lambda name: regs["divergence"].get(name).factory
    nested[Proposer] = regs["proposer"].create
    nested[Stage] = regs["backend"].create
    made: dict[str, list[tuple[str, str]]] = {}
    for kind, hook_name in HOOKS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():  # registration order: built-ins before later plugins
            plugin_name = impl.plugin_name

            def register(name: str, factory: Callable[..., Any], description: str = "", *, default: bool = False,
                         _kind: str = kind, _plugin: str = plugin_name) -> None:
                regs[_kind].register(name, factory, plugin=_plugin, description=description, default=default)
                made.setdefault(_plugin, []).append((_kind, name))

            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(f"plugin {plugin_name!r} failed in {hook.name}: {exc!r}") from exc
    for proposer in regs["proposer"].names():
        if proposer in regs["backend"]:
            raise PluginError(
                f"{proposer!r} is registered both as a proposer (plugin {regs['proposer'].get(proposer).plugin!r}) "
                f"and as a backend (plugin {regs['backend'].get(proposer).plugin!r}); stage names must be unique"
            )
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked (PYRAMID_CORE_DISABLE_PLUGINS)
            continue
        package, version = dists.get(name, (getattr(plugin, "__name__", type(plugin).__name__), ""))
        infos.append(PluginInfo(name, package, version, tuple(made.get(name, ()))))
        log.debug("plugin %s (%s %s) registers %s", name, package, version,
                  ", ".join(f"{k} {n}" for k, n in made.get(name, ())) or "nothing")
    return Registries(
        regs["policy"], regs["proposer"], regs["backend"], regs["wrapper"], regs["divergence"], regs["preset"],
        regs["chain"], regs["command"], tuple(sorted(infos, key=lambda i: i.name)),
    )


@functools.cache
def registries() -> Registries:
    """Registries of every loaded plugin (cached; see ``reload_plugins``)."""
    return _collect(*_managed())


def registries_with(*extra: object) -> Registries:
    """Registries of the installed plugins plus ``extra`` plugin objects (handy in tests)."""
    return _collect(*_new_manager(extra))


def reload_plugins() -> None:
    """Forget the cached manager, e.g. after changing ``PYRAMID_CORE_DISABLE_PLUGINS``."""
    _managed.cache_clear()
    plugin_manager.cache_clear()
    registries.cache_clear()
