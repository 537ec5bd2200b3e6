"""The generated pages of the documentation site, written at build time by mkdocs-gen-files
(``plugins: gen-files`` in mkdocs.yml) and never committed:

* ``reference/hooks.md`` -- every hookspec of ``pyramid_core.hookspecs`` with its signature and
  docstring, what the installed plugins register through it, and the installed plugins;
* ``reference/cli.md`` -- the ``--help`` of ``pyramid`` and of every subcommand of
  ``pyramid_core.cli.build_parser()`` (built-ins and commands plugins add);
* ``reference/api/`` -- one mkdocstrings page per public module of ``pyramid_core`` and
  ``pyramid_plugins``, found by walking the packages;
* ``tutorials/`` -- the notebooks of ``tutorials/`` (rendered with their committed outputs by
  mkdocs-jupyter) and their README as the index.

The page texts are plain functions of the code, so ``tests/test_docs.py`` checks them without
mkdocs installed.
"""

from __future__ import annotations

import argparse
import inspect
import os
import pkgutil
import re
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
API_PACKAGES = ("pyramid_core", "pyramid_plugins")
API_DIR = "reference/api"  # one page per module: API_DIR/NAME.md
# from an API page to the docs root: docstrings link the hand-written pages with it, e.g.
# [the two traps](../../algorithms.md#the-two-traps) (tests/test_docs.py checks every such link)
API_TO_DOCS = "../" * (API_DIR.count("/") + 1)
HELP_COLUMNS = "100"  # argparse wraps --help to the terminal width: fixed, so pages are stable


def markdown_text(doc: str) -> str:
    """A reStructuredText-flavoured docstring as Markdown: ``x`` -> `x`, literal blocks
    introduced by ``::`` fenced."""
    lines = inspect.cleandoc(doc).replace("``", "`").splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.endswith("::") and i + 1 < len(lines):
            out.append(line[:-1])
            block: list[str] = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            out += ["", "```", textwrap.dedent("\n".join(block)).strip("\n"), "```", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out).strip() + "\n"


def for_hooks_page(text: str) -> str:
    """Docstring links are written for the API pages (``API_TO_DOCS``); ``reference/hooks.md``
    is one level above them."""
    return text.replace(f"]({API_TO_DOCS}", "](../")


def hookspecs(module: types.ModuleType) -> dict[str, Callable[..., Any]]:
    """The hookspec functions of ``module`` in definition order (pluggy's marker attribute)."""
    marker = f"{module.PROJECT}_spec"
    return {name: fn for name, fn in vars(module).items() if inspect.isfunction(fn) and hasattr(fn, marker)}


def hooks_page(module: types.ModuleType | None = None, regs: Any = None) -> str:
    """``reference/hooks.md``: each hook of ``module`` (default ``pyramid_core.hookspecs``) and
    what the plugins of ``regs`` (default: the installed ones) register through it."""
    from pyramid_core import hookspecs as default_module
    from pyramid_core.lab.outputs import md_escape
    from pyramid_core.plugins import HOOKS, registries

    module = module or default_module
    regs = regs or registries()
    kind_of = {hook: kind for kind, hook in HOOKS.items()}
    by_kind = regs.by_kind()
    parts = [
        "# Hook reference\n",
        "Generated at build time from `pyramid_core.hookspecs` and the plugins installed where the "
        "site was built. How to write a plugin: [Writing a plugin](../plugins.md).\n",
        for_hooks_page(markdown_text(module.__doc__ or "")),
    ]
    for name, fn in hookspecs(module).items():
        parts.append(f"## `{name}`\n")
        signature = str(inspect.signature(fn)).replace("'", "")  # string annotations (__future__), unquoted
        parts.append(f"```python\n@hookimpl\ndef {name}{signature}: ...\n```\n")
        parts.append(for_hooks_page(markdown_text(fn.__doc__ or "(no docstring)")))
        registry = by_kind.get(kind_of.get(name, ""))
        if registry is None:
            continue
        entries = list(registry)
        if not entries:
            parts.append("No installed plugin registers anything through this hook.\n")
            continue
        rows = [f"| `{e.name}` | `{e.plugin}` | {e.description.replace('|', '/')} |" for e in entries]
        parts.append(f"Registered through it by the installed plugins ({registry.kind}):\n\n"
                     "| name | plugin | description |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    rows = [f"| `{p.name}` | {md_escape(p.package)} {md_escape(p.version)} | "
            f"{', '.join(f'{kind} `{what}`' for kind, what in p.registered) or '-'} |" for p in regs.plugins]
    parts.append("## Installed plugins\n\nWhat `pyramid plugins` lists where the site was built:\n\n"
                 "| plugin | package | registers |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``{name: subparser}`` of the parser's subcommands, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_page(parser: argparse.ArgumentParser | None = None) -> str:
    """``reference/cli.md``: the help of ``pyramid`` and of each subcommand."""
    os.environ["COLUMNS"] = HELP_COLUMNS
    if parser is None:
        from pyramid_core.cli import build_parser

        parser = build_parser()
    parts = [
        "# CLI reference\n",
        "Generated at build time from `pyramid_core.cli.build_parser()`: the built-in commands and "
        "those the installed plugins register (hook `register_commands`). A spec argument is "
        "`NAME[:key=value,...]`; the names are listed in the [hook reference](hooks.md).\n",
        f"```text\n{parser.format_help().rstrip()}\n```\n",
    ]
    for name, sub in subcommands(parser).items():
        parts.append(f"## `pyramid {name}`\n")
        if sub.description:
            parts.append(sub.description.strip() + "\n")
        parts.append(f"```text\n{sub.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


def public_modules(packages: tuple[str, ...] = API_PACKAGES) -> list[str]:
    """Every importable module of ``packages`` without a private part (``_x``, ``__main__``)."""
    import importlib

    names: list[str] = []
    for package in packages:
        pkg = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                names.append(info.name)
    return sorted(names)


def api_pages(modules: list[str] | None = None) -> dict[str, str]:
    """``reference/api/index.md`` and one page per module, rendered by mkdocstrings."""
    modules = modules or public_modules()
    index = ["# API reference\n", "From the docstrings of the public modules (generated at build time).\n"]
    pages: dict[str, str] = {}
    for package in API_PACKAGES:
        index.append(f"## `{package}`\n")
        for name in (m for m in modules if m == package or m.startswith(f"{package}.")):
            index.append(f"* [`{name}`]({name}.md)")
            pages[f"{API_DIR}/{name}.md"] = f"# `{name}`\n\n::: {name}\n"
        index.append("")
    pages[f"{API_DIR}/index.md"] = "\n".join(index)
    return pages


def tutorial_pages(directory: Path = ROOT / "tutorials") -> dict[str, str | bytes]:
    """The notebooks (bytes, as committed) and their README as ``tutorials/index.md``, its links
    into ``docs/`` made relative to the site."""
    readme = (directory / "README.md").read_text(encoding="utf-8")
    readme = re.sub(r"\]\(\.\./docs/([^)]+)\)", r"](../\1)", readme)
    pages: dict[str, str | bytes] = {"tutorials/index.md": readme}
    for path in sorted(directory.glob("*.ipynb")):
        pages[f"tutorials/{path.name}"] = path.read_bytes()
    return pages


def pages() -> Iterator[tuple[str, str | bytes]]:
    yield "reference/hooks.md", hooks_page()
    yield "reference/cli.md", cli_page()
    yield from api_pages().items()
    yield from tutorial_pages().items()


if __name__ == "<run_path>":  # executed by mkdocs-gen-files (runpy.run_path); importing it writes nothing
    import mkdocs_gen_files

    for path, content in pages():
        mode = "wb" if isinstance(content, bytes) else "w"
        with mkdocs_gen_files.open(path, mode) as f:
            f.write(content)
