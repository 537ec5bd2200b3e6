"""Nothing the code offers is undocumented.

The lists come from the code -- the hookspecs, the entry points of group ``pyramid_core`` (in
pyproject.toml and as installed), every name the built-in plugins register, the subcommands of
``pyramid_core.cli.build_parser()`` -- and are compared with the hand-written pages in
``docs/`` (a hook, a plugin or a registered name must appear as `name` in docs/plugins.md, a
command as `pyramid NAME` on some page). The generated reference pages (docs/gen_reference.py)
are checked to cover the same lists. No mkdocs is needed for these: the pages are Markdown, and
the generator's page texts are plain functions. Negative controls show each check catching an
omission.

The site itself is built by ``.ci/docs`` (the command CI and ``nox -s docs`` run: ``mkdocs build
--strict``, any warning an error) where mkdocs is installed: the docs as committed build, and a
copy with a broken link and an unescaped bench label fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import types
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from pyramid_core import hookspecs
from pyramid_core.cli import BUILTIN_COMMANDS, build_parser
from pyramid_core.plugins import registries

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the installed entry points alone
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BUILTIN_PACKAGE = "pyramid-core"


def load_generator() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_reference", module)
    spec.loader.exec_module(module)
    return module


gen = load_generator()


def guide() -> str:
    return (DOCS / "plugins.md").read_text(encoding="utf-8")


def hand_written() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.glob("*.md")))


def builtin_plugins() -> set[str]:
    """Entry points of group pyramid_core declared in pyproject.toml, and the installed plugins
    of this distribution (the two differ only in a stale install)."""
    declared = {}
    if tomllib is not None:
        declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["pyramid_core"]
    installed = {p.name for p in registries().plugins if p.package == BUILTIN_PACKAGE}
    return set(declared) | installed


def builtin_registrations() -> set[tuple[str, str]]:
    """(kind, name) of everything the built-in plugins register."""
    return {item for p in registries().plugins if p.package == BUILTIN_PACKAGE for item in p.registered}


def builtin_commands() -> list[str]:
    plugins = {p.name for p in registries().plugins if p.package == BUILTIN_PACKAGE}
    return [name for name, _, _ in BUILTIN_COMMANDS] + [r.name for r in registries().commands if r.plugin in plugins]


def mentioned(name: str, text: str) -> bool:
    return f"`{name}`" in text


def undocumented(*, hooks: list[str], plugins: set[str], registered: set[tuple[str, str]], commands: list[str],
                 guide_text: str, pages_text: str) -> list[str]:
    """What the docs omit, as 'hook x' / 'plugin x' / 'policy x' / 'command x'."""
    missing = [f"hook {h}" for h in hooks if not mentioned(h, guide_text)]
    missing += [f"plugin {p}" for p in sorted(plugins) if not mentioned(p, guide_text)]
    missing += [f"{kind} {name}" for kind, name in sorted(registered) if not mentioned(name, guide_text)]
    missing += [f"command {c}" for c in commands if not re.search(rf"`pyramid {re.escape(c)}\b", pages_text)]
    return missing


def test_the_code_lists_are_not_empty() -> None:
    """Guards the checks below against comparing empty lists."""
    assert {"register_policies", "register_commands"} <= set(gen.hookspecs(hookspecs))
    assert {"exact", "tree", "block", "traversal"} <= builtin_plugins()
    assert ("policy", "exact") in builtin_registrations() and ("wrapper", "tree") in builtin_registrations()
    assert {"generate", "check", "plugins"} <= set(builtin_commands())


def test_every_hook_plugin_registered_name_and_command_is_documented() -> None:
    missing = undocumented(hooks=list(gen.hookspecs(hookspecs)), plugins=builtin_plugins(),
                           registered=builtin_registrations(), commands=builtin_commands(),
                           guide_text=guide(), pages_text=hand_written())
    assert missing == [], (
        f"undocumented: {missing}; hooks, plugins and registered names belong in docs/plugins.md (as `name`), "
        "commands on a page of docs/ (as `pyramid NAME`)"
    )


def test_every_hook_has_a_docstring() -> None:
    assert [name for name, fn in gen.hookspecs(hookspecs).items() if not (fn.__doc__ or "").strip()] == []


def test_the_check_catches_each_kind_of_omission() -> None:
    """Negative control: a new hook, plugin, registered name and command, none documented."""
    found = undocumented(hooks=["register_policies", "register_widgets"], plugins={"exact", "widgets"},
                         registered={("policy", "exact"), ("widget", "sprocket")}, commands=["generate", "frobnicate"],
                         guide_text=guide(), pages_text=hand_written())
    assert found == ["hook register_widgets", "plugin widgets", "widget sprocket", "command frobnicate"]


def test_the_hook_reference_covers_every_hook_and_registration() -> None:
    page = gen.hooks_page()
    for name, fn in gen.hookspecs(hookspecs).items():
        assert f"## `{name}`" in page
        first_line = (fn.__doc__ or "").strip().splitlines()[0].replace("``", "`")
        assert first_line in page, name
    for plugin in registries().plugins:
        assert f"| `{plugin.name}` |" in page
        for _, name in plugin.registered:
            assert f"| `{name}` | `{plugin.name}` |" in page, name


def test_the_hook_reference_follows_the_hookspec_module() -> None:
    """A hook added to the hookspecs shows up in the generated page without editing anything."""
    fake = types.ModuleType("fake_hookspecs")
    fake.PROJECT = hookspecs.PROJECT  # type: ignore[attr-defined]
    fake.__doc__ = "Fake hooks."

    def register_widgets(register: Any) -> None:
        """Register widgets: ``register(name, factory)``."""

    fake.register_widgets = hookspecs.hookspec(register_widgets)  # type: ignore[attr-defined]
    page = gen.hooks_page(fake)
    assert "## `register_widgets`" in page and "Register widgets: `register(name, factory)`." in page


def test_the_cli_reference_has_every_subcommand_with_its_options() -> None:
    parser = build_parser()
    page = gen.cli_page(parser)
    subs = gen.subcommands(parser)
    assert set(builtin_commands()) <= set(subs)
    for name, sub in subs.items():
        assert f"## `pyramid {name}`" in page
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in page, (name, flag)


def test_the_cli_reference_follows_the_parser() -> None:
    parser = argparse.ArgumentParser(prog="pyramid")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("frobnicate", help="x", description="Frobnicate things.").add_argument("--level", type=int)
    page = gen.cli_page(parser)
    assert "## `pyramid frobnicate`" in page and "Frobnicate things." in page and "--level" in page


def test_the_api_reference_has_a_page_per_public_module() -> None:
    modules = gen.public_modules()
    assert {"pyramid_core", "pyramid_core.pipeline", "pyramid_core.hookspecs", "pyramid_plugins.exact"} <= set(modules)
    assert not [m for m in modules if any(part.startswith("_") for part in m.split("."))]
    pages = gen.api_pages(modules)
    for module in modules:
        assert pages[f"reference/api/{module}.md"].endswith(f"::: {module}\n")
        assert f"({module}.md)" in pages["reference/api/index.md"]


def test_the_tutorials_section_has_every_notebook() -> None:
    pages = gen.tutorial_pages()
    notebooks = sorted(p.name for p in (ROOT / "tutorials").glob("*.ipynb"))
    assert sorted(k.removeprefix("tutorials/") for k in pages if k.endswith(".ipynb")) == notebooks
    assert "../docs/" not in str(pages["tutorials/index.md"])  # links rewritten for the site


def test_every_hand_written_page_is_in_the_site_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert [p.name for p in sorted(DOCS.glob("*.md")) if f": {p.name}" not in nav] == []


# --- the docs are the reference: the code cites sections of docs/, never a "SPEC" -----------------

PACKAGES = ("pyramid_core", "pyramid_plugins")
# Files that still cite a "SPEC" document while they are being rewritten. This list must shrink to
# empty: remove a file as soon as it links docs/algorithms.md instead (a listed file that no longer
# cites SPEC fails test_the_spec_allow_list_holds_only_files_that_still_need_it).
SPEC_ALLOW_LIST_MUST_SHRINK_TO_EMPTY: frozenset[str] = frozenset()
# nothing stands in for "SPEC" any more: placeholders say NAME[:k=v,...], STAGE, POLICY or TREE
PLACEHOLDER = re.compile(r"(?!)")
# [text](../../page.md#anchor) in a docstring, and docs/page.md#anchor in comments and messages
DOC_LINK = re.compile(r"\]\(((?:\.\./)*)([\w/-]+\.md)#([^)\s]*)\)")
PLAIN_DOC_LINK = re.compile(r"\bdocs/([\w/-]+\.md)#([\w-]+)")


def package_sources() -> dict[str, str]:
    return {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
            for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def spec_citations(text: str) -> list[int]:
    """Line numbers citing a "SPEC" (placeholders aside)."""
    return [n for n, line in enumerate(text.splitlines(), 1) if "SPEC" in PLACEHOLDER.sub("", line)]


def slugify(heading: str) -> str:
    """A heading's anchor as mkdocs' toc extension makes it (Python-Markdown's default slugify,
    on the heading's text: code spans keep their text, emphasis marks go)."""
    text = unicodedata.normalize("NFKD", heading.replace("`", "").replace("*", ""))
    text = re.sub(r"[^\w\s-]", "", text.encode("ascii", "ignore").decode("ascii")).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: str) -> set[str]:
    """The heading anchors of a Markdown page (fenced code skipped; a repeated slug gets _1, _2)."""
    found: set[str] = set()
    fenced = False
    for line in page.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} +(.+?) *#*$", line)):
            slug = base = slugify(m.group(1))
            n = 0
            while slug in found:
                n += 1
                slug = f"{base}_{n}"
            found.add(slug)
    return found


def broken_links(text: str, prefix: str) -> list[str]:
    """Links of ``text`` to a section of a docs page that do not resolve: a Markdown link must go
    through ``prefix`` (the way from the page it renders on to docs/), then name an existing page
    and one of its heading anchors."""
    bad = []
    links = [(m.group(0), m.group(1), m.group(2), m.group(3)) for m in DOC_LINK.finditer(text)]
    links += [(m.group(0), prefix, m.group(1), m.group(2)) for m in PLAIN_DOC_LINK.finditer(text)]
    for link, up, page, anchor in links:
        target = DOCS / page
        if up != prefix:
            bad.append(f"{link}: the relative path must start with {prefix!r}")
        elif not target.is_file():
            bad.append(f"{link}: no page docs/{page}")
        elif anchor not in anchors(target.read_text(encoding="utf-8")):
            bad.append(f"{link}: no heading with anchor #{anchor} in docs/{page}")
    return bad


def test_no_module_cites_a_spec_document() -> None:
    """The project's reference is docs/algorithms.md; the code cites its sections by link."""
    found = {path: lines for path, text in package_sources().items()
             if path not in SPEC_ALLOW_LIST_MUST_SHRINK_TO_EMPTY and (lines := spec_citations(text))}
    assert found == {}, (f"'SPEC' cited at {found} (file: line numbers); link the section of docs/algorithms.md "
                         "instead, e.g. [the two traps](../../algorithms.md#the-two-traps)")


def test_the_spec_allow_list_holds_only_files_that_still_need_it() -> None:
    sources = package_sources()
    stale = [path for path in sorted(SPEC_ALLOW_LIST_MUST_SHRINK_TO_EMPTY)
             if path not in sources or not spec_citations(sources[path])]
    assert stale == [], f"{stale} no longer cite SPEC: remove them from SPEC_ALLOW_LIST_MUST_SHRINK_TO_EMPTY"


def test_every_section_link_in_the_code_and_the_docs_resolves() -> None:
    """Docstrings render on the API pages (gen.API_DIR), so they link docs/ through
    gen.API_TO_DOCS; the hand-written pages sit in docs/ itself."""
    assert gen.API_TO_DOCS == "../" * (gen.API_DIR.count("/") + 1) == "../../"
    sources = package_sources()
    bad = {path: b for path, text in sources.items() if (b := broken_links(text, gen.API_TO_DOCS))}
    bad |= {page.name: b for page in sorted(DOCS.glob("*.md"))
            if (b := broken_links(page.read_text(encoding="utf-8"), ""))}
    assert bad == {}
    linked = sum(len(DOC_LINK.findall(text)) for text in sources.values())
    assert linked >= 20  # the check has something to check


def test_the_link_checks_catch_a_spec_citation_and_a_broken_link() -> None:
    """Negative controls."""
    assert spec_citations('x = 1\n"""Exact (SPEC trap 1)."""\np.add_argument("--stage", metavar="SPEC")') == [2, 3]
    assert spec_citations("use --tree NAME[:k=v,...] or tree=NAME[:k=v,...]") == []
    good = "[the two traps](../../algorithms.md#the-two-traps), docs/algorithms.md#greedy-mode"
    assert broken_links(good, "../../") == []
    assert broken_links("[x](../../algorithms.md#the-two-trap)", "../../") == [
        "](../../algorithms.md#the-two-trap): no heading with anchor #the-two-trap in docs/algorithms.md"]
    assert len(broken_links("[x](../algorithms.md#the-two-traps)", "../../")) == 1  # wrong depth
    assert len(broken_links("[x](../../nowhere.md#a) docs/algorithms.md#spec", "../../")) == 2


def test_anchors_are_the_ones_mkdocs_makes() -> None:
    """Our slugify against Python-Markdown's toc extension (what mkdocs runs) on every page."""
    markdown = pytest.importorskip("markdown")
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        md = markdown.Markdown(extensions=["toc", "tables", "fenced_code"])
        html = md.convert(text)
        assert anchors(text) == set(re.findall(r'<h[1-6] id="([^"]+)"', html)), page.name
    assert slugify("Forward cost T(M)") == "forward-cost-tm"
    assert {"the-two-traps", "block-verification", "greedy-mode"} <= anchors((DOCS / "algorithms.md").read_text())


def test_the_hook_page_moves_api_page_links_one_level_up() -> None:
    assert gen.for_hooks_page("[t](../../algorithms.md#the-two-traps)") == "[t](../algorithms.md#the-two-traps)"

# --- the site build (.ci/docs) -------------------------------------------------------------------

SITE_SOURCES = ("mkdocs.yml", "docs", "tutorials", ".ci/docs")  # what mkdocs.yml and gen_reference read


def build_site(root: Path) -> subprocess.CompletedProcess[str]:
    """``root/.ci/docs`` with this interpreter's mkdocs and this checkout's packages."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run(["bash", str(root / ".ci" / "docs")], capture_output=True, text=True, env=env,
                          timeout=600, check=False)


def copy_site_sources(dest: Path) -> Path:
    for name in SITE_SOURCES:
        source, target = ROOT / name, dest / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return dest


def test_ci_and_nox_build_the_site_with_ci_docs() -> None:
    """The build the tests below run is the one CI and `nox -s docs` run."""
    assert "\nbash .ci/docs\n" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert '"bash", ".ci/docs"' in (ROOT / "noxfile.py").read_text(encoding="utf-8")


def test_the_site_builds_without_warnings_and_a_planted_warning_fails_it(tmp_path: Path) -> None:
    """Two builds (10-20 s each): the docs as committed pass; a copy with a link to a missing
    page and a bench row whose tree label is unescaped (Markdown reads ``[...](draft)`` as a
    link) fails, and the script prints both warnings but not the whole log."""
    pytest.importorskip("mkdocs", reason="the docs toolchain (pip install -e '.[docs]') is not installed")
    clean = build_site(copy_site_sources(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "no warnings" in clean.stdout

    planted = copy_site_sources(tmp_path / "planted")
    with (planted / "docs" / "index.md").open("a", encoding="utf-8") as f:
        f.write("\nSee [the missing page](no-such-page.md).\n")
    with (planted / "docs" / "benchmarks.md").open("a", encoding="utf-8") as f:
        f.write("\n| config | ms/forward per stage |\n|---|---|\n"
                "| tree draft→target | tree[budget=8,4,top-k](draft) 4.4 / smollm2-135m 34.9 |\n")
    broken = build_site(planted)
    out = broken.stdout + broken.stderr
    assert broken.returncode != 0, out
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert any("index.md" in w and "no-such-page.md" in w for w in warnings), out
    assert any("benchmarks.md" in w and "'draft'" in w for w in warnings), out
    assert len(out.splitlines()) < 40, out  # the warnings and the log's tail, not the INFO lines
