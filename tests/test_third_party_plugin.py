"""A real third-party plugin package, installed the way a user would install it.

``examples/pyramid-example-plugin`` (own pyproject.toml, entry-point group ``pyramid_core``)
registers the lossless policy ``capped``. The test builds and installs it into a temporary
directory with pip (offline: no dependencies, no build isolation, no index), then runs a fresh
interpreter with that directory on PYTHONPATH, exactly as if the package were installed next to
pyramid-core, and checks that it is discovered, listed, usable by spec string, can be disabled,
and stays lossless.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from stats import ALPHA, REJECT, chisquare_pvalue, counts

from pyramid_core.plugins import registries

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pyramid-example-plugin"

# Context-free tables of the lossless check: draft and target are TV 0.4 apart.
DRAFT = [0.10, 0.20, 0.30, 0.40]
TARGET = [0.40, 0.30, 0.20, 0.10]
RUNS, LENGTH = 1500, 4

PROBE = textwrap.dedent(
    """
    import contextlib, io, json, os, sys
    import torch
    torch.set_num_threads(1)  # thousands of tiny generations
    from pyramid_core import build_pipeline
    from pyramid_core.cli import main
    from pyramid_core.plugins import registries, reload_plugins
    from pyramid_core.testing import TableModel

    DRAFT, TARGET, RUNS, LENGTH = json.loads(sys.argv[1])
    regs = registries()
    reg = regs.policies.get("capped")
    out = {
        "plugins": [[p.name, p.package, p.version, [list(r) for r in p.registered]] for p in regs.plugins],
        "policy": [reg.name, reg.plugin, reg.description],
        "module": sys.modules[type(regs.policies.create("capped")).__module__].__file__,
    }
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["plugins", "--json"]) == 0
    out["cli"] = json.loads(buf.getvalue())

    stages = [TableModel(DRAFT, name="draft"), TableModel(TARGET, name="target")]
    pipe = build_pipeline(stages, ["capped:max_accept=1"], [3])
    assert pipe.policies[0].max_accept == 1  # "1" converted to int through the annotation
    tokens, hist = [], [0, 0, 0]
    for seed in range(RUNS):
        gen = pipe.generate([0], LENGTH, seed=seed)
        tokens.append(gen.token_list)
        for i, h in enumerate(gen.metrics.boundaries[0].accepted_hist):
            hist[i] += h
    out["tokens"], out["accepted_hist"] = tokens, hist

    os.environ["PYRAMID_CORE_DISABLE_PLUGINS"] = "capped"
    reload_plugins()
    out["registered_when_disabled"] = "capped" in registries().policies
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install a copy of the example (building in place would leave build/ and *.egg-info
    in the repository) into a fresh --target directory."""
    tmp = tmp_path_factory.mktemp("third_party")
    src = tmp / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--no-index", "--disable-pip-version-check", "--target", str(site), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_NO_INDEX": "1"})
    assert done.returncode == 0, f"pip failed:\n{done.stdout}\n{done.stderr}"
    assert (site / "pyramid_example_plugin" / "__init__.py").is_file()
    return site


@pytest.fixture(scope="module")
def probe(installed: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "PYRAMID_CORE_DISABLE_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([str(installed), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([DRAFT, TARGET, RUNS, LENGTH])],
        capture_output=True, text=True, timeout=600, env=env, cwd=installed.parent,
    )
    assert done.returncode == 0, f"probe failed:\n{done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_example_is_not_installed_in_this_interpreter() -> None:
    """The plugin seen below really comes from the pip-installed package."""
    assert "capped" not in registries().policies


def test_plugin_is_discovered_with_its_package_name(probe: dict[str, Any], installed: Path) -> None:
    assert ["capped", "pyramid-example-plugin", "0.1.0", [["policy", "capped"]]] in probe["plugins"]
    assert probe["policy"][:2] == ["capped", "capped"]
    assert "lossless" in probe["policy"][2]
    # built-ins are still there, registered by pyramid-core itself
    assert ["exact", "pyramid-core"] in [p[:2] for p in probe["plugins"]]
    assert Path(probe["module"]).resolve().is_relative_to(installed.resolve())


def test_plugins_command_lists_it(probe: dict[str, Any]) -> None:
    listed = {p["name"]: p for p in probe["cli"]}
    assert listed["capped"]["package"] == "pyramid-example-plugin"
    assert listed["capped"]["registered"] == [{"kind": "policy", "name": "capped"}]


def test_plugin_can_be_disabled_by_its_entry_point_name(probe: dict[str, Any]) -> None:
    assert probe["registered_when_disabled"] is False


def test_pipeline_with_the_plugin_policy_stays_exact(probe: dict[str, Any]) -> None:
    """2 stages, block length 3, ``capped:max_accept=1``: 1500 runs x 4 tokens pooled (6000
    tokens, i.i.d. target under the null hypothesis) fit the target at ALPHA and reject the
    draft's table (TV 0.4) at 1e-6. At most one token is accepted per round."""
    tokens = probe["tokens"]
    assert len(tokens) == RUNS and all(len(t) == LENGTH for t in tokens)
    assert chisquare_pvalue(counts(tokens, 4), TARGET) > ALPHA
    assert chisquare_pvalue(counts(tokens, 4), DRAFT) < REJECT
    hist = probe["accepted_hist"]
    assert hist[2] == 0 and hist[0] > 0 and hist[1] > 0
