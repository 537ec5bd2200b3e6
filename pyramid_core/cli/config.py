"""``--config FILE``: a command's options from a file (``generate``, ``bench``, ``sweep``, ``plan``).

The file is TOML whose keys are the command's options, by flag or by argument name
(``max-new-tokens`` and ``max_new_tokens`` alike), or a results JSON the command wrote: its
``run.arguments`` (``run_arguments``) are the options of the run, so that one command reruns
it. The file's values become the parser's defaults (``parser.set_defaults``) before the command
line is parsed, so every flag given on the command line wins -- a repeated flag (``--stage``)
replaces the file's list rather than adding to it. Values are checked by the flag's own
argparse type and choices; an unknown key is an error naming it, the close one and the valid
ones. See docs/configs.md.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from pyramid_core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["config_arg", "apply_config", "finish_config", "run_arguments", "read_config", "command_of",
           "PLUMBING"]

# namespace entries that are how the command line works, not what a run does
PLUMBING = frozenset({"func", "command", "command_prog", "argv", "config", "verbose", "quiet",
                      "distill_run", "distill_command"})


def config_arg(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` on ``p`` (its values are read by ``main`` through ``apply_config``)."""
    p.add_argument("--config", metavar="FILE",
                   help="options from a TOML file (keys: this command's options, e.g. max_new_tokens = 32, "
                        "stage = [\"ngram\", \"smollm2\"]) or from a results JSON this command wrote (rerun it); "
                        "flags given here win over the file")


def _plain(value: Any) -> Any:
    """``value`` as JSON: enums by value, paths and other objects as text."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_arguments(ns: argparse.Namespace) -> dict[str, Any]:
    """The effective options of a run (every argument, from the command line, a config file or
    the defaults; not the command line's plumbing), as JSON: what results files record and
    what ``--config RESULTS.json`` reads back."""
    return {k: _plain(v) for k, v in sorted(vars(ns).items()) if k not in PLUMBING and not callable(v)}


def command_of(argv: Sequence[str]) -> str:
    """The subcommand named in ``argv`` (its first word that is not an option), or ``""``."""
    return next((a for a in argv if not a.startswith("-")), "")


def _config_path(argv: Sequence[str]) -> str | None:
    path = None
    for i, a in enumerate(argv):
        if a == "--":
            break
        if a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
    return path


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(name)
            return sub if isinstance(sub, argparse.ArgumentParser) else None
    return None


@attrs.define
class Applied:
    """What ``apply_config`` did: the file, and the list defaults it set (``finish_config``)."""

    path: str
    lists: dict[str, list[Any]]


def apply_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Applied | None:
    """Read ``--config FILE`` from ``argv`` (when its command takes one) and make the file's
    values the defaults of that command's parser; a required option the file gives is no
    longer required. Call ``finish_config`` on the parsed namespace."""
    path = _config_path(argv)
    sub = _subparser(parser, command_of(argv))
    if path is None or sub is None or "--config" not in sub._option_string_actions:
        return None  # no file; or a command without --config, which argparse refuses by name
    values = read_config(path, sub, command_of(argv))
    lists = {dest: v for dest, v in values.items() if isinstance(v, list)}
    sub.set_defaults(**values)
    for action in sub._actions:
        if action.required and action.dest in values and values[action.dest] is not None:
            action.required = False
    return Applied(path, lists)


def finish_config(ns: argparse.Namespace, applied: Applied | None) -> None:
    """A list option the command line repeated replaces the file's list (argparse appends to
    a default); ``--config`` abbreviated (``--conf``) is refused, since it was not read."""
    if applied is None:
        if getattr(ns, "config", None) is not None:
            raise ConfigError("--config: write the flag in full (--config FILE or --config=FILE)")
        return
    for dest, default in applied.lists.items():
        value = getattr(ns, dest, None)
        if isinstance(value, list) and value is not default and value[:len(default)] == default:
            setattr(ns, dest, value[len(default):])


def _options(p: argparse.ArgumentParser) -> tuple[dict[str, str], dict[str, list[argparse.Action]]]:
    """Key -> dest for every spelling of every option of ``p`` (dest, dest with dashes, each long
    flag without its dashes), and dest -> the actions writing it."""
    keys: dict[str, str] = {}
    actions: dict[str, list[argparse.Action]] = {}
    for a in p._actions:
        if not a.option_strings or a.dest in PLUMBING or a.dest in ("help", argparse.SUPPRESS) \
                or isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            continue
        actions.setdefault(a.dest, []).append(a)
        keys[a.dest] = keys[a.dest.replace("_", "-")] = a.dest
        for flag in a.option_strings:
            if flag.startswith("--"):
                name = flag[2:]
                if name.startswith("no-") and isinstance(a, argparse.BooleanOptionalAction):
                    continue
                keys[name] = keys[name.replace("-", "_")] = a.dest
    return keys, actions


def _load(path: Path, command: str) -> dict[str, Any]:
    """The key/value table of ``path``: TOML, or the recorded arguments of a results JSON."""
    where = f"--config {str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; give a TOML file of options or a results JSON") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc})") from None
        run = data.get("run") if isinstance(data, dict) else None
        if run is None and isinstance(data, dict) and isinstance(data.get("meta"), dict):
            run = data["meta"].get("run")
        if not isinstance(run, dict) or not isinstance(run.get("arguments"), dict):
            raise ConfigError(f"{where}: a JSON file here must be a results file with the run's arguments "
                              "(run.arguments), as bench, sweep, plan --json and generate --metrics write; "
                              "give a TOML file of options otherwise")
        recorded = str(run.get("command", ""))
        if recorded and command and recorded.split()[-1] != command:
            raise ConfigError(f"{where} records a `{recorded}` run, not `pyramid {command}`; "
                              f"run `{recorded} --config {path}`")
        return dict(run["arguments"])
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML ({exc})") from None
    return table


def _convert_one(a: argparse.Action, value: Any, key: str, where: str) -> Any:
    """One value through the action's argparse type and choices."""
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: {key} takes one value, got {value!r}")
    if a.type is not None and callable(a.type):
        try:
            value = a.type(str(value).lower() if isinstance(value, bool) else str(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {key} = {value!r}: {exc}") from None
    elif not isinstance(value, str):
        value = str(value)
    if a.choices is not None and value not in a.choices:
        raise ConfigError(f"{where}: {key} = {value!r} is not one of {', '.join(map(str, a.choices))}")
    return value


def _convert(p: argparse.ArgumentParser, dest: str, actions: list[argparse.Action], key: str, value: Any,
             where: str) -> Any:
    """The file's ``value`` for ``dest`` as parsing the flag would have made it."""
    if value is None:  # JSON null: the option was not set
        return None
    first = actions[0]
    if isinstance(first, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} takes true or false, got {value!r}")
        return value
    if all(isinstance(a, argparse._StoreConstAction) for a in actions):  # e.g. --compile / --no-compile
        options = {str(_plain(a.const)): a.const for a in actions}
        default = p.get_default(dest)
        options.setdefault(str(_plain(default)), default)
        if str(value) not in options:
            raise ConfigError(f"{where}: {key} = {value!r} is not one of {', '.join(options)}")
        return options[str(value)]
    if isinstance(first, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: {key} takes a count (an integer >= 0), got {value!r}")
        return value
    if isinstance(first, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [_convert_one(first, v, key, where) for v in items]
    if isinstance(value, list) and first.type is None:  # e.g. lengths_3 = [4, 8] for --lengths-3 4,8
        value = ",".join(map(str, value))
    return _convert_one(first, value, key, where)


def read_config(path: str | Path, p: argparse.ArgumentParser, command: str = "") -> dict[str, Any]:
    """Dest -> value of the options in ``path`` for parser ``p`` (module docstring); a
    ``ConfigError`` names the file, the key and what would be valid."""
    file = Path(path).expanduser()
    where = f"--config {str(file)!r}"
    keys, actions = _options(p)
    out: dict[str, Any] = {}
    for key, value in _load(file, command).items():
        dest = keys.get(key)
        if dest is None:
            valid = sorted({d for d in keys.values()})
            close = difflib.get_close_matches(key.replace("-", "_"), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint} (valid keys for `{p.prog}`: "
                              f"{', '.join(valid)})")
        if dest in out:
            raise ConfigError(f"{where}: {key!r} sets {dest!r} a second time")
        out[dest] = _convert(p, dest, actions[dest], key, value, where)
    return out
