"""The plugin manager: entry points of group ``pyramid_core`` fill three registries.

Built-in plugins (``pyramid_plugins.*``) are registered through the same entry-point group as
third-party ones. ``PYRAMID_CORE_DISABLE_PLUGINS=name1,name2`` blocks plugins by entry-point name.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import attrs
import pluggy
from torch import Tensor

from pyramid_core import hookspecs
from pyramid_core.errors import PluginError
from pyramid_core.presets import Preset
from pyramid_core.protocols import AcceptancePolicy, Proposer, Stage
from pyramid_core.registry import Registry

__all__ = ["Registries", "PluginInfo", "plugin_manager", "registries", "reload_plugins", "DISABLE_ENV"]

DISABLE_ENV = "PYRAMID_CORE_DISABLE_PLUGINS"


@attrs.frozen
class PluginInfo:
    name: str
    package: str
    version: str
    registered: tuple[tuple[str, str], ...]  # (kind, name)


@attrs.frozen
class Registries:
    policies: Registry[AcceptancePolicy]
    proposers: Registry[Proposer]
    backends: Registry[Stage]
    divergences: Registry[Tensor]
    presets: Registry[Preset]
    plugins: tuple[PluginInfo, ...]


def _new_manager(extra: tuple[object, ...] = ()) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in filter(None, (n.strip() for n in os.environ.get(DISABLE_ENV, "").split(","))):
        pm.set_blocked(name)
    try:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    except Exception as exc:  # a broken third-party plugin must say which one it is
        raise PluginError(f"a plugin of entry-point group {hookspecs.PROJECT!r} failed to load: {exc!r}") from exc
    for plugin in extra:
        pm.register(plugin)
    return pm


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    return _new_manager()


def _collect(pm: pluggy.PluginManager) -> Registries:
    regs: dict[str, Registry[Any]] = {
        "policy": Registry("policy"),
        "proposer": Registry("proposer"),
        "backend": Registry("backend"),
        "divergence": Registry("divergence"),
        "preset": Registry("preset"),
    }
    hooks = {
        "policy": pm.hook.register_policies,
        "proposer": pm.hook.register_proposers,
        "backend": pm.hook.register_backends,
        "divergence": pm.hook.register_divergences,
        "preset": pm.hook.register_presets,
    }
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    made: dict[str, list[tuple[str, str]]] = {}
    for kind, hook in hooks.items():
        for impl in hook.get_hookimpls():  # registration order: built-ins before later plugins
            plugin_name = impl.plugin_name

            def register(name: str, factory: Callable[..., Any], description: str = "", *,
                         _kind: str = kind, _plugin: str = plugin_name) -> None:
                regs[_kind].register(name, factory, plugin=_plugin, description=description)
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
        dist = dists.get(id(plugin))
        package = dist.project_name if dist is not None else getattr(plugin, "__name__", type(plugin).__name__)
        version = dist.version if dist is not None else ""
        infos.append(PluginInfo(name, package, version, tuple(made.get(name, ()))))
    return Registries(
        regs["policy"], regs["proposer"], regs["backend"], regs["divergence"], regs["preset"],
        tuple(sorted(infos, key=lambda i: i.name)),
    )


@functools.cache
def registries() -> Registries:
    """Registries of every loaded plugin (cached; see ``reload_plugins``)."""
    return _collect(plugin_manager())


def registries_with(*extra: object) -> Registries:
    """Registries of the installed plugins plus ``extra`` plugin objects (handy in tests)."""
    return _collect(_new_manager(extra))


def reload_plugins() -> None:
    """Forget the cached manager, e.g. after changing ``PYRAMID_CORE_DISABLE_PLUGINS``."""
    plugin_manager.cache_clear()
    registries.cache_clear()
