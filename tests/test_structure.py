"""The shape of the build path: nested specs resolved by the registries they came from, defaults
declared by plugins (and a clear message when their plugin is disabled), stage wrappers and
commands as hooks, a named broken plugin, ``PipelineSpec``, ``Metrics.pool``, and the import
layering (no circle, no import from a lower layer up)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch

from pyramid_core import ConfigError, PipelineSpec, PluginError, SamplingConfig, build_pipeline
from pyramid_core.hookspecs import hookimpl
from pyramid_core.pipeline import Metrics
from pyramid_core.plugins import DISABLE_ENV, registries, registries_with, reload_plugins
from pyramid_core.testing import TableModel
from pyramid_core.types import Block
from pyramid_plugins.exact import ExactPolicy
from pyramid_plugins.fallback import Fallback
from pyramid_plugins.fuzzy import FuzzyPolicy, tv

ROOT = Path(__file__).resolve().parents[1]
P = [0.1, 0.3, 0.2, 0.4]
Q = [0.4, 0.3, 0.2, 0.1]


def plugin(name: str, **hooks: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(mod, hook, hookimpl(fn))
    return mod


@pytest.fixture
def clean_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    reload_plugins()
    yield monkeypatch
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    reload_plugins()


# --- nested specs ---------------------------------------------------------------------------------


def test_nested_policy_spec_with_parameters_goes_in_parentheses() -> None:
    policy = registries().policies.create("assisted:inner=(fuzzy:div=tv,tau=0.3)")
    assert isinstance(policy, Fallback) and isinstance(policy.inner, FuzzyPolicy)
    assert policy.inner.div is tv and policy.inner.tau == 0.3
    assert registries().policies.create("assisted:inner=exact").inner == ExactPolicy()
    assert registries().policies.create("assisted").inner is None
    assert registries().policies.create("assisted:inner=none").inner is None


def test_an_unparenthesised_nested_spec_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"no parameter 'tau'.*goes in parentheses, e\.g\. inner=\(NAME:a=1,b=2\)"):
        registries().policies.create("assisted:inner=fuzzy:div=tv,tau=0.3")
    with pytest.raises(ConfigError, match=r"unknown policy 'exakt'; did you mean 'exact'"):
        registries().policies.create("assisted:inner=exakt")
    with pytest.raises(ConfigError, match=r"unbalanced"):
        registries().policies.create("assisted:inner=(fuzzy:tau=0.3")


def test_nested_specs_are_resolved_by_the_registries_they_came_from() -> None:
    """A policy and a divergence that only ``registries_with`` knows are found inside nested
    specs (the factories never reach for the global registry)."""
    def register_policies(register: Any) -> None:
        register("mine", lambda: ExactPolicy(), "exact under another name")

    def register_divergences(register: Any) -> None:
        register("half_tv", lambda p, q: 0.5 * tv(p, q), "half the total variation")

    regs = registries_with(plugin("nested_extra", register_policies=register_policies,
                                  register_divergences=register_divergences))
    assert regs.policies.create("assisted:inner=mine").inner == ExactPolicy()
    fuzzy = regs.policies.create("assisted:inner=(fuzzy:div=half_tv,tau=0.2)").inner
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]])
    assert float(fuzzy.divergence(p, q)) == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="unknown policy 'mine'"):
        registries().policies.create("assisted:inner=mine")
    with pytest.raises(ConfigError, match="unknown divergence 'half_tv'"):
        registries().policies.create("fuzzy:div=half_tv")
    pipe = build_pipeline([TableModel(Q), TableModel(P)], ["assisted:inner=mine"], [2], regs=regs)
    assert len(pipe.generate([0], 5, seed=0).token_list) == 5


# --- defaults come from plugins ------------------------------------------------------------------


def test_defaults_are_declared_by_plugins() -> None:
    regs = registries()
    assert regs.policies.default is not None and regs.policies.default.name == "exact"
    assert regs.policies.default.plugin == "exact"
    assert regs.chains.default is not None and regs.chains.default.plugin == "smollm2_family"
    pipe = build_pipeline([TableModel(Q), TableModel(P)])
    assert pipe.policies == [ExactPolicy()] and list(pipe.block_lengths) == [4]


def test_two_plugins_declaring_a_default_is_an_error() -> None:
    def register_policies(register: Any) -> None:
        register("other", ExactPolicy, default=True)

    with pytest.raises(PluginError, match=r"two plugins declare a default policy: 'exact' \(plugin 'exact'\) "
                                          r"and 'other' \(plugin 'rival'\)"):
        registries_with(plugin("rival", register_policies=register_policies))


def test_a_missing_default_policy_is_a_clear_error(clean_plugins: pytest.MonkeyPatch) -> None:
    clean_plugins.setenv(DISABLE_ENV, "exact")
    reload_plugins()
    with pytest.raises(PluginError, match=r"no default policy: no policy was given, but no loaded plugin declares "
                                          r"a default policy \(is the plugin that does disabled"):
        build_pipeline([TableModel(Q), TableModel(P)])
    pipe = build_pipeline([TableModel(Q), TableModel(P)], ["fuzzy"])  # naming one still works
    assert isinstance(pipe.policies[0], FuzzyPolicy)


def _cli(args: list[str], disabled: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, DISABLE_ENV: disabled}
    return subprocess.run([sys.executable, "-m", "pyramid_core.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_with_the_default_plugins_disabled_explains_instead_of_a_traceback() -> None:
    out = _cli(["plugins"], "exact")
    assert out.returncode == 0, out.stderr
    assert "policy: none -- no loaded plugin declares a default policy" in out.stdout
    assert "chain: smollm2-family (plugin smollm2_family)" in out.stdout
    out = _cli(["check", "--dist", "0.5,0.5", "--dist", "0.2,0.8"], "exact")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "pyramid check: error: no default policy" in out.stderr
    out = _cli(["generate", "--prompt", "hi"], "smollm2_family")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "pyramid generate: error: no default chain: no stages were given" in out.stderr


# --- stage wrappers and commands are hooks ---------------------------------------------------------


class FirstTokenWrapper:
    """A toy wrapper: proposes the wrapped stage's argmax, one token (a deterministic proposer)."""

    def __init__(self, stage: Any, sampling: SamplingConfig, stop_ids: Any) -> None:
        self.stage, self.vocab_size = stage, stage.vocab_size

    def propose(self, context: torch.Tensor, n: int, rng: Any) -> Block:
        token = int(self.stage.score(context)[0].argmax())
        return Block(torch.tensor([token]), torch.nn.functional.one_hot(torch.tensor([token]), self.vocab_size).float())


def test_a_third_party_stage_wrapper_is_used_like_tree() -> None:
    def register_wrappers(register: Any) -> None:
        register("argmax", lambda stage, *, sampling, stop_ids: FirstTokenWrapper(stage, sampling, stop_ids))

    regs = registries_with(plugin("wrapper_plugin", register_wrappers=register_wrappers))
    pipe = build_pipeline([TableModel(Q), TableModel(P)], tree="argmax", regs=regs)
    assert isinstance(pipe.stages[0], FirstTokenWrapper)
    assert len(pipe.generate([0], 6, seed=1).token_list) == 6
    with pytest.raises(PluginError, match=r"'argmax' is a stage wrapper, not a stage.*--tree argmax"):
        build_pipeline(["argmax", TableModel(P)], regs=regs)
    with pytest.raises(PluginError, match=r"unknown wrapper 'argmax'"):
        build_pipeline([TableModel(Q), TableModel(P)], tree="argmax")


def test_a_plugin_command_is_added_to_the_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from pyramid_core import plugins
    from pyramid_core.cli import main

    def configure(parser: Any) -> Any:
        parser.add_argument("--times", type=int, default=1)

        def run(ns: Any) -> int:
            if ns.times < 1:
                raise ConfigError("--times must be >= 1")
            print("hello " * ns.times)
            return 0

        return run

    def register_commands(register: Any) -> None:
        register("hello", configure, "say hello")

    regs = registries_with(plugin("hello_plugin", register_commands=register_commands))
    monkeypatch.setattr(plugins, "registries", lambda: regs)
    assert main(["hello", "--times", "2"]) == 0
    assert capsys.readouterr().out.count("hello") == 2
    assert main(["hello", "--times", "0"]) == 2
    assert "pyramid hello: error: --times must be >= 1" in capsys.readouterr().err

    def register_clash(register: Any) -> None:
        register("bench", configure, "clashes")

    regs = registries_with(plugin("clash_plugin", register_commands=register_clash))
    monkeypatch.setattr(plugins, "registries", lambda: regs)
    assert main(["bench"]) == 2
    assert "command 'bench' of a plugin clashes with a built-in" in capsys.readouterr().err


def test_a_plugin_that_fails_to_import_is_named(tmp_path: Path) -> None:
    """An installed distribution whose entry point raises on import: the error names the plugin,
    its module and package, and how to disable it."""
    (tmp_path / "broken_plugin_mod.py").write_text("raise ImportError('missing dependency: frobnicate')\n")
    info = tmp_path / "pyramid_broken-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pyramid-broken\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pyramid_core]\nbroken = broken_plugin_mod\n")
    code = textwrap.dedent("""
        from pyramid_core.plugins import registries
        registries()
    """)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    assert ("plugin 'broken' (broken_plugin_mod, from package pyramid-broken) failed to load: "
            "ImportError: missing dependency: frobnicate") in out.stderr
    assert f"{DISABLE_ENV}=broken" in out.stderr
    env[DISABLE_ENV] = "broken"
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr


# --- PipelineSpec and Metrics.pool -------------------------------------------------------------------


def test_pipeline_spec_is_one_frozen_value_with_one_resolve() -> None:
    spec = PipelineSpec((TableModel(Q), TableModel(Q), TableModel(P)), preset="psd-f",
                        sampling=SamplingConfig(temperature=0.7))
    stages, policies, lengths = spec.parts()
    assert len(stages) == 3 and policies == ["fuzzy:div=js,tau=0.4", "fuzzy:div=js,tau=0.5"] and lengths == [15, 25]
    pipe = spec.resolve()
    assert [type(p) for p in pipe.policies] == [FuzzyPolicy, FuzzyPolicy] and pipe.sampling.temperature == 0.7
    with pytest.raises(ConfigError, match="give either a preset"):
        PipelineSpec((TableModel(P),), policies=("exact",), preset="sd")
    with pytest.raises(ConfigError, match=r"2 stages need 1 block lengths \(one per boundary\), got 2"):
        PipelineSpec((TableModel(Q), TableModel(P)), block_lengths=(1, 2)).resolve()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        spec.preset = "sd"  # type: ignore[misc]


def test_decode_options_are_checked_once_where_they_enter() -> None:
    """PipelineSpec checks every decode option up front, through DecodeOptions (no model loaded)."""
    from pyramid_core.options import DecodeOptions

    with pytest.raises(ConfigError, match=r"confidence_stop must be in \[0, 1\) \(0 = off\), got 1.5"):
        PipelineSpec(("x",), confidence_stop=1.5)
    with pytest.raises(ConfigError, match=r"unknown length schedule 'slow'; valid: fixed, adaptive"):
        PipelineSpec(("x",), length_schedule="slow")
    with pytest.raises(ConfigError, match=r"on_nonfinite must be one of raise, warn, got 'ignore'"):
        PipelineSpec(("x",), on_nonfinite="ignore")
    with pytest.raises(ConfigError, match=r"stop_ids must be non-negative token ids, got -3 in \[2, -3\]"):
        PipelineSpec(("x",), stop_ids=(2, -3))
    spec = PipelineSpec(("x",), confidence_stop=0.25, stop_ids=[5])
    assert spec.decode == DecodeOptions(SamplingConfig(), (5,), "fixed", 0.25, "raise")
    pipe = build_pipeline([TableModel(Q), TableModel(P)], ["exact"], [3], confidence_stop=0.25)
    assert pipe.decode.confidence_stop == 0.25 and pipe.decode.stop_ids == ()


def test_metrics_pool_sums_every_counter() -> None:
    pipe = build_pipeline([TableModel(Q), TableModel(P)], ["exact"], [3])
    runs = [pipe.generate([0], 12, seed=s).metrics for s in range(5)]
    pooled = Metrics.pool(runs)
    assert pooled.new_tokens == sum(m.new_tokens for m in runs) == 60
    assert pooled.wall_s == pytest.approx(sum(m.wall_s for m in runs))
    b = pooled.boundaries[0]
    assert b.proposed == sum(m.boundaries[0].proposed for m in runs)
    assert b.rounds == sum(m.boundaries[0].rounds for m in runs) == sum(b.accepted_hist)
    assert b.accepted == sum(i * c for i, c in enumerate(b.accepted_hist)) == sum(b.accepted_at)
    assert pooled.stages[1].forwards == sum(m.stages[1].forwards for m in runs) == pooled.target_forwards
    with pytest.raises(ConfigError, match="at least one run"):
        Metrics.pool([])


# --- layering: no circle, nothing imports up -------------------------------------------------------

LAYERS = {  # a module may import its own layer and the layers below (lower number)
    "core": 0, "backends": 1, "plugins": 2, "tools": 3, "cli": 4,
}
TOOLS = {"lab", "serving", "testing"}


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "pyramid_plugins":
        return "plugins"
    sub = parts[1] if len(parts) > 1 else "__init__"
    if sub == "backends":
        return "backends"
    if sub == "cli":
        return "cli"
    if sub in TOOLS:
        return "tools"
    assert (ROOT / "pyramid_core" / f"{sub}.py").exists(), f"{module}: a package that is not a layer"
    return "core"  # a module at the top of pyramid_core: what a plugin author imports


def _imports() -> dict[str, set[str]]:
    """module -> the pyramid modules it imports (at any depth of the file)."""
    graph: dict[str, set[str]] = {}
    for package in ("pyramid_core", "pyramid_plugins"):
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            targets: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyramid_"):
                    targets.add(node.module)
                elif isinstance(node, ast.Import):
                    targets |= {a.name for a in node.names if a.name.startswith("pyramid_")}
            graph[name] = targets
    return graph


def test_no_module_imports_a_higher_layer() -> None:
    graph = _imports()
    up = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts
                if m != "pyramid_core" and LAYERS[_layer(t)] > LAYERS[_layer(m)])
    assert up == []
    # the core is pure of tools and backends; the latency model is maths; no plugin uses the global
    latency = [m for m in graph if m == "pyramid_core.lab.latency" or m.startswith("pyramid_core.lab.latency.")]
    assert len(latency) > 1 and all("pyramid_core.pipeline" not in graph[m] for m in latency)
    for module, targets in graph.items():
        if module.startswith("pyramid_plugins"):
            assert "pyramid_core.plugins" not in targets, module
    assert not any("registries()" in p.read_text() for p in (ROOT / "pyramid_plugins").glob("*.py"))


def test_no_import_circle() -> None:
    graph = _imports()
    modules = set(graph)

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    edges = {m: {r for t in ts if (r := resolve(t)) and r != m and not m.startswith(r + ".")} for m, ts in graph.items()}
    # packages' __init__ re-export their children: an edge into a package is an edge to what it re-exports
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if m.startswith(t + ".") or t.startswith(m + "."):
                continue
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if state.get(t) is None and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(modules):
        if state.get(m) is None:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)
