"""``pyramid setup`` and ``pyramid plugins``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from pyramid_core import plugins
from pyramid_core.cli.common import show_progress

__all__ = ["configure_setup", "configure_plugins"]


def configure_setup(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument("--verify", action="store_true",
                   help="check the sha256 of every stored file, not only of those modified since setup (~2 s)")
    return run_setup


def run_setup(ns: argparse.Namespace) -> int:
    # lazy: the hf backend loads with its plugin
    from pyramid_core.backends.hf.files import FAMILY_INSTALL, family_installed
    from pyramid_core.backends.hf.smollm2 import ensure_smollm2, family_dir

    path = ensure_smollm2(progress=show_progress(ns), verify=ns.verify)
    print(f"SmolLM2-135M (float32 safetensors) ready at {path}")
    if not family_installed():  # the framework works without it; the default chain needs it
        print(f"distilled family not installed (the default chain `smollm2-family` needs it): {FAMILY_INSTALL}")
        return 0
    checked = verify_family()
    print(f"distilled family ({', '.join(checked) or 'no stages'}) verified in {family_dir()}")
    return 0


def verify_family() -> list[str]:
    """Check each shipped stage of the distilled family against the size and sha256 its
    ``stage.json`` records (a ``ConfigError`` naming the file and the fix); return their names."""
    from pyramid_core.backends.hf.files import check_record, check_safetensors, read_json
    from pyramid_core.backends.hf.smollm2 import family_dir

    checked = []
    for stage in sorted(p.parent for p in family_dir().glob("*/stage.json")):
        record = read_json(stage / "stage.json").get("weights")
        if isinstance(record, dict):
            check_record(stage / "model.safetensors", record, sha256="always")
        check_safetensors(stage / "model.safetensors")
        checked.append(stage.name)
    return checked


def configure_plugins(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument("--json", action="store_true")
    return run_plugins


def run_plugins(ns: argparse.Namespace) -> int:
    regs = plugins.registries()
    if ns.json:
        print(json.dumps([
            {"name": p.name, "package": p.package, "version": p.version,
             "registered": [{"kind": k, "name": n} for k, n in p.registered]}
            for p in regs.plugins
        ], indent=2))
        return 0
    for p in regs.plugins:
        what = ", ".join(f"{k} {n}" for k, n in p.registered) or "nothing"
        print(f"{p.name:<14} {p.package} {p.version}".rstrip() + f"  -> {what}")
    for kind, reg in (("policies", regs.policies), ("proposers", regs.proposers), ("backends", regs.backends),
                      ("wrappers", regs.wrappers), ("chains", regs.chains), ("commands", regs.commands)):
        if not len(reg) and kind == "commands":
            continue
        print(f"\n{kind}:")
        for r in reg:
            mark = " [default]" if reg.default is not None and reg.default.name == r.name else ""
            print(f"  {r.name:<14} ({r.plugin}){mark} {r.description}")
    print("\ndefaults:")
    for kind, reg, used in (("policy", regs.policies, "at every boundary a --policy does not name"),
                            ("chain", regs.chains, "the stages when no --stage is given")):
        if reg.default is None:
            print(f"  {kind}: none -- no loaded plugin declares a default {kind}, so commands that need "
                  f"one ({used}) ask for it explicitly (is its plugin disabled by PYRAMID_CORE_DISABLE_PLUGINS?)")
        else:
            print(f"  {kind}: {reg.default.name} (plugin {reg.default.plugin}), {used}")
    return 0
