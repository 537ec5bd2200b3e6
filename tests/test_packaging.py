"""The distributions as declared: pyramid-core holds code only, the family is its own
distribution found through its entry point, and the versions pyproject.toml claims are the ones
the nox sessions test. (.ci/package builds and installs the wheels; this checks the declarations.)"""

from __future__ import annotations

import ast
import contextlib
import re
import sys
from pathlib import Path

import pytest

from pyramid_core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _pyproject(path: Path) -> dict:  # type: ignore[type-arg]
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _nox_constants() -> dict[str, object]:
    """The module-level constants of noxfile.py (read, not imported: nox may be absent)."""
    tree = ast.parse((ROOT / "noxfile.py").read_text(encoding="utf-8"))
    out: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError):  # an expression, not a constant
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def _nox_session_pythons(name: str) -> list[str]:
    tree = ast.parse((ROOT / "noxfile.py").read_text(encoding="utf-8"))
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    for deco in fn.decorator_list:
        if isinstance(deco, ast.Call):
            for kw in deco.keywords:
                if kw.arg == "python":
                    value = ast.literal_eval(kw.value) if not isinstance(kw.value, ast.Name) else _nox_constants()[kw.value.id]
                    return list(value) if isinstance(value, list) else [str(value)]
    raise AssertionError(f"nox session {name} names no python")


def test_core_distribution_ships_code_and_metadata_only() -> None:
    meta = _pyproject(ROOT / "pyproject.toml")
    project = meta["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")[:200]
    assert project["keywords"] and project["urls"]["Documentation"] and project["authors"]
    assert f"## [{project['version']}]" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    data = meta["tool"]["setuptools"]["package-data"]
    assert not [p for files in data.values() for p in files if "family" in p or "safetensors" in p or p.endswith("/*")]
    assert not list((ROOT / "pyramid_core").rglob("*.safetensors")), "weights inside the pyramid-core package"


def test_the_python_versions_claimed_are_the_ones_tested() -> None:
    project = _pyproject(ROOT / "pyproject.toml")["project"]
    tested = sorted({*_nox_session_pythons("pythons"), *_nox_session_pythons("tests")},
                    key=lambda v: tuple(map(int, v.split("."))))
    assert project["requires-python"] == f">={tested[0]}"
    claimed = sorted(c.rsplit(":: ", 1)[1] for c in project["classifiers"]
                     if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    low, high = (tuple(map(int, v.split("."))) for v in (tested[0], tested[-1]))
    assert claimed == [f"3.{m}" for m in range(low[1], high[1] + 1)]  # every minor version in the tested range


def test_the_lowest_torch_and_transformers_declared_are_the_ones_tested() -> None:
    deps = _pyproject(ROOT / "pyproject.toml")["project"]["dependencies"]
    consts = _nox_constants()

    def lower(name: str) -> str:
        (spec,) = [d for d in deps if re.match(rf"{name}\s*>=", d)]
        return spec.split(">=")[1].strip()

    assert str(consts["TORCH_LOWEST"]) == f"torch=={lower('torch')}.0"
    assert str(consts["TRANSFORMERS_LOWEST"]).startswith(f"transformers=={lower('transformers')}.")


def test_family_is_its_own_distribution_with_an_entry_point() -> None:
    family = _pyproject(ROOT / "family" / "pyproject.toml")["project"]
    assert family["name"] == "pyramid-smollm2-family" and "pyramid-core>=0.1" in family["dependencies"]
    assert family["entry-points"]["pyramid_core"] == {"smollm2_family": "pyramid_smollm2_family.plugin"}
    for role in ("draft", "qualifier", "feature"):
        assert (ROOT / "family" / "pyramid_smollm2_family" / "data" / role / "stage.json").is_file()


def test_the_default_chain_comes_from_the_family_plugin() -> None:
    from pyramid_core.plugins import registries

    regs = registries()
    assert regs.chains.default is not None and regs.chains.default.name == "smollm2-family"
    assert regs.chains.default.plugin == "smollm2_family"


def test_without_the_family_its_stages_say_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyramid_plugins.hf_backend as hf_backend
    from pyramid_core.backends.hf import files

    monkeypatch.setattr(files, "FAMILY_PACKAGE", "pyramid_smollm2_family_not_installed")
    assert not files.family_installed()
    with pytest.raises(ConfigError, match=r"pyramid-smollm2-family\) is not installed; pip install -e \./family"):
        files.family_dir()
    assert "reinstall" not in files.fix_for(ROOT / "family" / "pyramid_smollm2_family" / "data" / "draft")
    monkeypatch.setattr(hf_backend, "smollm2_ready", lambda directory=None: True)
    monkeypatch.setattr(hf_backend, "family_installed", lambda: False)
    for role in ("draft", "qualifier", "feature"):
        with pytest.raises(ConfigError, match=rf"smollm2:stage={role} is a stage of the distilled family, which is not installed"):
            hf_backend.smollm2_stage(stage=role)
