"""Registries (name -> factory, spec strings) and the plugin manager (entry points, disabling,
extra plugin objects), plus the rule that every hook is documented."""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from pyramid_core import ConfigError, PluginError, build_pipeline, hookspecs, make_policy
from pyramid_core.build import default_chain
from pyramid_core.errors import PluginWarning
from pyramid_core.hookspecs import hookimpl
from pyramid_core.plugins import DISABLE_ENV, registries, registries_with, reload_plugins
from pyramid_core.registry import Registry, parse_spec
from pyramid_core.testing import TableModel
from pyramid_plugins.exact import ExactPolicy

ROOT = Path(__file__).resolve().parents[1]


def make(**kwargs: Any) -> dict[str, Any]:
    return kwargs


def typed(tau: float = 0.1, n: int = 1, flag: bool = False, div: str = "js") -> dict[str, Any]:
    return {"tau": tau, "n": n, "flag": flag, "div": div}


def optional(limit: int | None = None) -> dict[str, Any]:
    return {"limit": limit}


def picky(tau: float = 0.5) -> dict[str, Any]:
    if not 0 <= tau <= 1:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    return {"tau": tau}


@attrs.frozen
class AttrsPolicy:
    tau: float = 0.1
    strict: bool = False


class PlainPolicy:
    """A plain class whose parameters are annotated on ``__init__`` only."""

    def __init__(self, tau: float = 0.1, strict: bool = False) -> None:
        self.tau = tau
        self.strict = strict


@pytest.fixture
def reg() -> Registry[Any]:
    r: Registry[Any] = Registry("policy")
    r.register("typed", typed, plugin="alpha", description="annotated function")
    r.register("make", make, plugin="alpha")
    r.register("optional", optional, plugin="beta")
    r.register("picky", picky, plugin="beta")
    r.register("attrs-policy", AttrsPolicy, plugin="beta")
    r.register("plain", PlainPolicy, plugin="beta")
    return r


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_duplicate_name_names_both_plugins(reg: Registry[Any]) -> None:
    with pytest.raises(PluginError, match=r"policy 'typed' is registered twice: by plugin 'alpha' and by plugin 'gamma'"):
        reg.register("typed", make, plugin="gamma")
    assert reg.get("typed").plugin == "alpha"  # the first registration is untouched


@pytest.mark.parametrize("bad", ["", "a:b", "a,b"])
def test_invalid_names_are_refused(reg: Registry[Any], bad: str) -> None:
    with pytest.raises(PluginError, match=rf"plugin 'gamma' registered an invalid policy name {re.escape(repr(bad))}"):
        reg.register(bad, make, plugin="gamma")


def test_non_callable_factory_is_refused(reg: Registry[Any]) -> None:
    with pytest.raises(PluginError, match="plugin 'gamma' registered policy 'x' with a non-callable factory"):
        reg.register("x", 42, plugin="gamma")  # type: ignore[arg-type]


def test_unknown_name_suggests_the_closest_and_lists_the_rest(reg: Registry[Any]) -> None:
    with pytest.raises(PluginError, match=r"unknown policy 'typd'; did you mean 'typed'\? \(available: attrs-policy, make, optional, picky, plain, typed\)"):
        reg.get("typd")
    with pytest.raises(PluginError) as info:
        reg.create("zzzzzz")
    assert "did you mean" not in str(info.value)
    assert "available: attrs-policy, make" in str(info.value)


def test_registry_container_protocol(reg: Registry[Any]) -> None:
    assert "typed" in reg and "nope" not in reg
    assert len(reg) == 6
    assert reg.names() == ["attrs-policy", "make", "optional", "picky", "plain", "typed"]
    assert [r.name for r in reg] == reg.names()
    assert reg.get("typed").description == "annotated function"
    assert set(reg.describe()) == set(reg.names())


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("exact", ("exact", {})),
        ("exact:", ("exact", {})),
        ("fuzzy:div=js,tau=0.3", ("fuzzy", {"div": "js", "tau": "0.3"})),
        ("  fuzzy : div = js , tau=0.3 ", ("fuzzy", {"div": "js", "tau": "0.3"})),
        ("hf:path=/models/x,dtype=bfloat16", ("hf", {"path": "/models/x", "dtype": "bfloat16"})),
        ("x:url=a=b", ("x", {"url": "a=b"})),  # only the first '=' separates key and value
        ("x:empty=", ("x", {"empty": ""})),
    ],
)
def test_parse_spec(spec: str, expected: tuple[str, dict[str, str]]) -> None:
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", r"empty name in spec ''; expected NAME or NAME:key=value"),
        (":tau=1", r"empty name in spec ':tau=1'"),
        ("fuzzy:tau", r"'fuzzy': parameter 'tau' is not of the form key=value \(in 'fuzzy:tau'\)"),
        ("fuzzy:tau=1,", r"'fuzzy': parameter '' is not of the form key=value"),
        ("fuzzy:=1", r"'fuzzy': parameter '=1' is not of the form key=value"),
        ("fuzzy:tau=1,,div=js", r"'fuzzy': parameter '' is not of the form key=value"),
    ],
)
def test_malformed_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_spec(spec)


def test_values_are_converted_with_the_factorys_annotations(reg: Registry[Any]) -> None:
    assert reg.create("typed:tau=0.25,n=7,flag=true,div=kl_pq") == {"tau": 0.25, "n": 7, "flag": True, "div": "kl_pq"}
    assert reg.create("typed") == {"tau": 0.1, "n": 1, "flag": False, "div": "js"}
    out = reg.create("typed:tau=1,n=-3")
    assert out["tau"] == 1.0 and isinstance(out["tau"], float)
    assert out["n"] == -3 and isinstance(out["n"], int)
    assert reg.create("optional:limit=5") == {"limit": 5}


@pytest.mark.parametrize(("text", "value"), [("true", True), ("True", True), ("1", True), ("yes", True), ("on", True),
                                             ("false", False), ("FALSE", False), ("0", False), ("no", False), ("off", False)])
def test_bool_spellings(reg: Registry[Any], text: str, value: bool) -> None:
    assert reg.create(f"typed:flag={text}")["flag"] is value


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("typed:n=abc", r"policy 'typed': parameter n='abc' is not a valid"),
        ("typed:n=1.5", r"policy 'typed': parameter n='1.5' is not a valid"),
        ("typed:tau=fast", r"policy 'typed': parameter tau='fast' is not a valid"),
        ("typed:flag=maybe", r"policy 'typed': parameter flag='maybe' is not a valid"),
    ],
)
def test_values_that_do_not_convert_name_the_parameter(reg: Registry[Any], spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        reg.create(spec)


def test_unknown_parameter_is_named_with_the_valid_ones(reg: Registry[Any]) -> None:
    with pytest.raises(ConfigError, match=r"policy 'typed' has no parameter 'tua'; did you mean 'tau'\? \(parameters: tau, n, flag, div\)"):
        reg.create("typed:tua=0.3")
    with pytest.raises(ConfigError, match=r"policy 'typed' has no parameter 'zzz' \(parameters: tau, n, flag, div\)"):
        reg.create("typed:zzz=1")


def test_factory_with_var_keywords_accepts_any_parameter_as_given(reg: Registry[Any]) -> None:
    assert reg.create("make:a=1,b=x") == {"a": "1", "b": "x"}


def test_keyword_overrides_win_and_are_not_converted(reg: Registry[Any]) -> None:
    assert reg.create("typed:n=3,div=kl", n=5)["n"] == 5
    assert reg.create("typed", tau=0.9)["tau"] == 0.9


def test_factory_errors_become_config_errors_naming_the_plugin(reg: Registry[Any]) -> None:
    with pytest.raises(ConfigError, match=r"policy 'picky' \(from plugin 'beta'\): tau must be in \[0, 1\], got 2.0"):
        reg.create("picky:tau=2")


def test_attrs_class_factory_is_converted(reg: Registry[Any]) -> None:
    policy = reg.create("attrs-policy:tau=0.3,strict=false")
    assert policy == AttrsPolicy(0.3, False)


def test_plain_class_factory_is_converted_with_its_init_annotations(reg: Registry[Any]) -> None:
    """A class is the most natural factory; its parameters are annotated on ``__init__``. The
    string "false" must become False (a non-empty string would be truthy) and "0.3" a float."""
    policy = reg.create("plain:tau=0.3,strict=false")
    assert policy.tau == 0.3
    assert policy.strict is False


# ----------------------------------------------------------------------------------------------
# plugin manager
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def clean_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Reload plugins before and after a test that changes the environment."""
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    reload_plugins()
    yield monkeypatch
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    reload_plugins()


def test_builtins_are_registered_through_entry_points_of_pyramid_core(clean_plugins: pytest.MonkeyPatch) -> None:
    regs = registries()
    assert "exact" in regs.policies and "ngram" in regs.proposers
    assert regs.policies.get("exact").plugin == "exact"
    assert regs.proposers.get("ngram").plugin == "ngram"
    info = {p.name: p for p in regs.plugins}
    assert info["exact"].package == "pyramid-core" and info["ngram"].package == "pyramid-core"
    assert ("policy", "exact") in info["exact"].registered
    assert ("proposer", "ngram") in info["ngram"].registered
    assert isinstance(make_policy("exact"), ExactPolicy)
    assert registries() is registries()  # cached


def test_disabling_a_plugin_by_environment(clean_plugins: pytest.MonkeyPatch) -> None:
    clean_plugins.setenv(DISABLE_ENV, "ngram")
    reload_plugins()
    regs = registries()
    assert "ngram" not in regs.proposers
    assert "exact" in regs.policies
    with pytest.raises(PluginError, match=r"unknown stage 'ngram'"):
        build_pipeline(["ngram", TableModel([0.5, 0.5])], block_lengths=[2])
    # several names, spaces allowed
    clean_plugins.setenv(DISABLE_ENV, " ngram , exact ")
    reload_plugins()
    assert "exact" not in registries().policies and "ngram" not in registries().proposers
    # and back
    clean_plugins.delenv(DISABLE_ENV)
    reload_plugins()
    assert "ngram" in registries().proposers and "exact" in registries().policies


def test_a_disabled_plugin_is_not_listed_as_loaded(clean_plugins: pytest.MonkeyPatch) -> None:
    """``registries().plugins`` is what ``pyramid plugins`` prints: a blocked plugin must not
    show up there as if loaded (e.g. as package 'NoneType' registering nothing)."""
    clean_plugins.setenv(DISABLE_ENV, "ngram")
    reload_plugins()
    listed = {p.name: p for p in registries().plugins}
    assert "ngram" not in listed, listed.get("ngram")
    assert listed["exact"].package == "pyramid-core"


def plugin_module(name: str, **hooks: Any) -> types.ModuleType:
    """A plugin object as pluggy sees a module: named functions marked ``@hookimpl``."""
    mod = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(mod, hook, hookimpl(fn))
    return mod


def test_extra_plugin_object_adds_a_policy(clean_plugins: pytest.MonkeyPatch) -> None:
    def register_policies(register: Any) -> None:
        register("always-bonus", lambda: ExactPolicy(), "test policy")

    regs = registries_with(plugin_module("my_extra_plugin", register_policies=register_policies))
    assert regs.policies.get("always-bonus").plugin == "my_extra_plugin"
    assert isinstance(regs.policies.create("always-bonus"), ExactPolicy)
    assert "exact" in regs.policies  # the installed plugins are still there
    info = {p.name: p for p in regs.plugins}["my_extra_plugin"]
    assert info.registered == (("policy", "always-bonus"),)
    assert "always-bonus" not in registries().policies  # the cached registries are untouched


def test_extra_plugin_registering_exact_again_is_an_error(clean_plugins: pytest.MonkeyPatch) -> None:
    def register_policies(register: Any) -> None:
        register("exact", ExactPolicy)

    with pytest.raises(PluginError, match=r"policy 'exact' is registered twice: by plugin '(exact|dup_plugin)' and by plugin '(exact|dup_plugin)'") as info:
        registries_with(plugin_module("dup_plugin", register_policies=register_policies))
    message = str(info.value)
    assert "'exact'" in message and "'dup_plugin'" in message
    assert "PYRAMID_CORE_DISABLE_PLUGINS=" in message


def test_stage_name_used_by_a_proposer_and_a_backend_is_an_error(clean_plugins: pytest.MonkeyPatch) -> None:
    def register_backends(register: Any) -> None:
        register("ngram", lambda: None)

    with pytest.raises(PluginError, match=r"'ngram' is registered both as a proposer \(plugin 'ngram'\) and as a backend \(plugin 'clash'\)"):
        registries_with(plugin_module("clash", register_backends=register_backends))


def test_a_plugin_failing_in_its_hook_is_named(clean_plugins: pytest.MonkeyPatch) -> None:
    def register_policies(register: Any) -> None:
        raise RuntimeError("boom")

    with pytest.raises(PluginError, match=r"plugin 'broken_plugin' failed in register_policies: RuntimeError\('boom'\)"):
        registries_with(plugin_module("broken_plugin", register_policies=register_policies))


# ----------------------------------------------------------------------------------------------
# every hook is documented
# ----------------------------------------------------------------------------------------------


def hookspec_functions(module: types.ModuleType) -> dict[str, Any]:
    marker = f"{hookspecs.PROJECT}_spec"
    return {name: fn for name, fn in vars(module).items() if inspect.isfunction(fn) and hasattr(fn, marker)}


def undocumented_hooks(module: types.ModuleType, guide: str) -> list[str]:
    """Hooks without a docstring, or not mentioned (as `name`) in the plugin guide."""
    return sorted(name for name, fn in hookspec_functions(module).items()
                  if not (fn.__doc__ or "").strip() or f"`{name}`" not in guide)


def test_every_hook_has_a_docstring_and_is_in_the_plugin_guide() -> None:
    guide = (ROOT / "docs" / "plugins.md").read_text()
    hooks = hookspec_functions(hookspecs)
    assert {"register_policies", "register_proposers", "register_backends"} <= set(hooks)
    assert undocumented_hooks(hookspecs, guide) == []
    # the guide also covers the mechanics a plugin author needs
    for needle in ("[project.entry-points.pyramid_core]", "@hookimpl", DISABLE_ENV, "register(",
                   "examples/pyramid-example-plugin", "pyramid plugins"):
        assert needle in guide, needle


def test_the_documentation_check_catches_an_undocumented_hook() -> None:
    """Negative control of the test above: a new hook without docstring or guide entry."""
    fake = types.ModuleType("fake_hookspecs")

    def register_widgets(register: Any) -> None:
        pass

    def register_gadgets(register: Any) -> None:
        """Documented here, but missing from the guide."""

    for fn in (register_widgets, register_gadgets):
        setattr(fake, fn.__name__, hookspecs.hookspec(fn))
    fake.register_policies = hookspecs.register_policies  # type: ignore[attr-defined]
    guide = (ROOT / "docs" / "plugins.md").read_text()
    assert undocumented_hooks(fake, guide) == ["register_gadgets", "register_widgets"]


# ----------------------------------------------------------------------------------------------
# plugins whose factories return the wrong thing
# ----------------------------------------------------------------------------------------------


def test_a_preset_factory_returning_a_string_is_named() -> None:
    """Before: AttributeError ('str' object has no attribute 'policies')."""
    def register_presets(register: Any) -> None:
        register("stringy", lambda n_stages: "exact,exact")

    regs = registries_with(plugin_module("bad_preset", register_presets=register_presets))
    with pytest.raises(PluginError, match=r"^preset 'stringy' \(from plugin 'bad_preset', hook register_presets\): "
                                          r"its factory returned str 'exact,exact'; it must return a "
                                          r"pyramid_core.recipes.Preset\(name, policies, block_lengths\) for 3 stages"):
        build_pipeline([TableModel([0.5, 0.5])] * 3, preset="stringy", regs=regs)


def test_a_backend_returning_a_plain_object_is_named() -> None:
    """Before: 'the target ... must be a model stage, not a proposer'."""
    def register_backends(register: Any) -> None:
        register("hollow", lambda: object())

    regs = registries_with(plugin_module("bad_backend", register_backends=register_backends))
    with pytest.raises(PluginError, match=r"^backend 'hollow' \(from plugin 'bad_backend', hook register_backends\): "
                                          r"its factory returned object <object object at .*>; it must return a "
                                          r"model Stage \(vocab_size, device, score\(context, block\) -> logits\)"):
        build_pipeline([TableModel([0.5, 0.5]), "hollow"], regs=regs)


def test_a_proposer_returning_garbage_is_named() -> None:
    def register_proposers(register: Any) -> None:
        register("none-proposer", lambda: None)

    regs = registries_with(plugin_module("bad_proposer", register_proposers=register_proposers))
    with pytest.raises(PluginError, match=r"^proposer 'none-proposer' \(from plugin 'bad_proposer', hook "
                                          r"register_proposers\): its factory returned NoneType None; it must "
                                          r"return a Proposer"):
        build_pipeline(["none-proposer", TableModel([0.5, 0.5])], block_lengths=[2], regs=regs)


def test_a_default_chain_returning_garbage_is_named(clean_plugins: pytest.MonkeyPatch) -> None:
    clean_plugins.setenv(DISABLE_ENV, "smollm2_family")  # the default chain of the family
    reload_plugins()

    def register_chains(register: Any) -> None:
        register("mine", lambda: ["draft", "target"], default=True)

    regs = registries_with(plugin_module("bad_chain", register_chains=register_chains))
    with pytest.raises(PluginError, match=r"^chain 'mine' \(from plugin 'bad_chain', hook register_chains\): its "
                                          r"factory returned list \['draft', 'target'\]; it must return a "
                                          r"pyramid_core.recipes.Chain\(name, stages, block_lengths\)"):
        default_chain(regs)


def test_disabling_a_plugin_that_does_not_exist_warns_with_the_known_names(clean_plugins: pytest.MonkeyPatch) -> None:
    """Before: silently ignored."""
    clean_plugins.setenv(DISABLE_ENV, "ngram,ngarm")
    reload_plugins()
    with pytest.warns(PluginWarning, match=r"PYRAMID_CORE_DISABLE_PLUGINS names 'ngarm', but no installed plugin has "
                                           r"that name, so it disables nothing; installed plugins: .*\bexact\b.*"
                                           r"\bngram\b") as record:
        regs = registries()
    assert len(record) == 1  # 'ngram' exists: no warning for it
    assert "ngram" not in regs.proposers
