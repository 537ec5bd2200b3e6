"""Where commands write: output paths checked before the work starts, a JSON-lines log that
keeps every finished piece of a run (a configuration, a prompt) as soon as it is measured, and
the escaping of names written into Markdown reports.

- ``output_dir(path, flag)`` / ``output_file(path, flag)``: the path made ready (missing parent
  folders created) and probed by writing to it, or a ``ConfigError`` naming the flag -- a file
  where a folder is needed (or the reverse), a path under a file, an unwritable place.
- ``RecordLog``: one JSON object per line, flushed and synced after each record, opened with
  the run's arguments. A rerun with the same arguments sees what is already recorded
  (``done``) and skips it; a rerun with other arguments moves the old log aside (it is kept,
  never overwritten) and starts a new one. A line cut short by an interrupted write is ignored.
- ``RunLock(folder, command)``: one run at a time per output folder. A second run on the same
  folder is refused with a ``ConfigError`` naming the running one (pid, host, start time) and the
  lock file. The lock is an ``fcntl.flock`` on ``.pyramid.lock`` there, whose JSON body names the
  holder: the OS drops a flock when its process dies (even killed with SIGKILL), so a lock file
  left by a run that ended without releasing it holds no lock and is taken over (``took_over``
  names that run) -- no guess from a pid that may have been reused, or that lives on another
  host. (Windows has no ``fcntl``: there the lock is not taken.)
- ``json_text(value)``: strict JSON of a result -- a non-finite float (NaN, an infinity) is written
  as ``null``, since ``NaN`` / ``Infinity`` are not JSON and strict parsers refuse them. Every
  results file and ``--json`` / ``--metrics`` output goes through it (``RecordLog``, a resume log
  read back only by this module, keeps Python's NaN so that a resumed record equals the original).
- ``md_escape(text)``: a label, a stage spec, a note or any other string as literal Markdown
  text, safe inside a table cell; every writer of a Markdown report passes its names through it.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from pyramid_core.errors import ConfigError

__all__ = ["output_dir", "output_file", "RecordLog", "RunLock", "md_escape"]
__all__ = ["output_dir", "output_file", "RecordLog", "md_escape", "json_text", "finite_or_null"]


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float, in mappings, lists and tuples at any depth, as ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def json_text(value: Any, *, indent: int | None = None, default: Callable[[Any], Any] | None = None) -> str:
    """``json.dumps(value)`` as strict JSON: non-finite floats become ``null`` (module docstring);
    ``default`` converts what JSON has no type for, as in ``json.dumps``."""
    convert = None if default is None else (lambda obj: finite_or_null(default(obj)))
    return json.dumps(finite_or_null(value), indent=indent, default=convert, allow_nan=False)

# Markdown syntax anywhere in a line (a backslash escape works in CommonMark and Python-Markdown;
# the tables extension adds ``\|``). Parentheses need no escape: they only make a link right
# after a ``]``, and every ``]`` is escaped.
_MD_INLINE = re.compile(r"[\\`*_\[\]|]")
# what Python-Markdown cannot backslash-escape: ``<`` opening a tag or an autolink, ``&`` opening
# an entity, ``~`` (strikethrough on GitHub); written as entities instead
_MD_ENTITY = re.compile(r"<(?=[A-Za-z/!?])|&(?=[#A-Za-z0-9])|~")
_ENTITIES = {"<": "&lt;", "&": "&amp;", "~": "&#126;"}
# block syntax at the start of a line (a heading, a quote, a list item), e.g. after ``- ``
_MD_LEADING = re.compile(r"^(\s*)(?:([#>+-])|(\d+)([.)]))")


def md_escape(text: str) -> str:
    """``text`` as literal Markdown: rendered (by mkdocs' Python-Markdown with ``tables``, or by
    GitHub) it reads as ``text``, never as a link, emphasis, code, HTML or a cell border; e.g.
    the tree label ``tree[budget=8](draft)`` is written ``tree\\[budget=8\\](draft)``. Line
    breaks become spaces (a table row is one line)."""
    out = _MD_INLINE.sub(r"\\\g<0>", " ".join(text.splitlines()))
    out = _MD_ENTITY.sub(lambda m: _ENTITIES[m.group()], out)
    return _MD_LEADING.sub(lambda m: m.group(1) + (f"\\{m.group(2)}" if m.group(2) else f"{m.group(3)}\\{m.group(4)}"),
                           out, count=1)


def _parents_usable(path: Path, flag: str) -> None:
    """Every existing ancestor of ``path`` is a folder (a path under a file cannot be created)."""
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, so nothing can be created under it; "
                              "give a path in a folder")


def _probe(folder: Path, flag: str, path: Path) -> None:
    """Write and remove a scratch file in ``folder``."""
    try:
        fd, name = tempfile.mkstemp(prefix=".pyramid-probe-", dir=folder)
    except OSError as exc:
        raise ConfigError(f"{flag} {str(path)!r}: cannot write in {str(folder)!r} ({exc.strerror or exc}); "
                          "give a writable place") from None
    os.close(fd)
    os.unlink(name)


def _mkdir(folder: Path, flag: str, path: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {str(path)!r}: cannot create the folder {str(folder)!r} "
                          f"({exc.strerror or exc}); give a writable place") from None


def output_dir(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a folder to write into, created if missing (module docstring)."""
    out = Path(path).expanduser()
    _parents_usable(out, flag)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {str(out)!r} is a file, but a folder is needed here (for several output files); "
                          "give a folder path")
    _mkdir(out, flag, out)
    _probe(out, flag, out)
    return out


def output_file(path: str | Path, flag: str) -> Path:
    """``path`` as a file to write, its folder created if missing; an existing file is fine (it
    will be replaced) but a folder is not (module docstring)."""
    out = Path(path).expanduser()
    _parents_usable(out, flag)
    if out.is_dir():
        raise ConfigError(f"{flag} {str(out)!r} is a folder, but a file is needed here; give a file path "
                          f"(e.g. {str(out / 'metrics.json')!r})")
    _mkdir(out.parent, flag, out)
    if out.exists() and not os.access(out, os.W_OK):
        raise ConfigError(f"{flag} {str(out)!r}: the file exists and is not writable; give a writable place")
    _probe(out.parent, flag, out)
    return out


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class RecordLog:
    """A JSON-lines log of one run's finished pieces (module docstring).

    The first line is ``{"run": args}``; every other line a record with a ``"key"``. ``done``
    maps each recorded key to its record (the last one wins)."""

    def __init__(self, path: str | Path, args: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.args = _jsonable(dict(args))
        self.done: dict[str, dict[str, Any]] = {}
        self.moved_aside: Path | None = None
        previous = list(self._read()) if self.path.exists() else []
        if previous and previous[0].get("run") == self.args:
            for record in previous[1:]:
                if isinstance(record.get("key"), str):
                    self.done[record["key"]] = record
            self._rewrite(previous)  # drops a line cut short by an interrupted write
            return
        if self.path.exists() and self.path.stat().st_size > 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.moved_aside = self.path.with_name(f"{self.path.stem}.{stamp}{self.path.suffix}")
            self.path.replace(self.moved_aside)
        self._rewrite([{"run": self.args}])

    def _read(self) -> Iterator[dict[str, Any]]:
        with self.path.open() as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # an interrupted write: the piece is measured again
                    continue
                if isinstance(record, dict):
                    yield record

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w") as fh:
            for record in records:
                fh.write(json.dumps(record, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)

    def append(self, key: str, record: Mapping[str, Any]) -> None:
        """Record the finished piece ``key`` now (flushed and synced to disk)."""
        full = _jsonable({"key": key, **record})
        with self.path.open("a") as fh:
            fh.write(json.dumps(full) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done[key] = full

    def get(self, key: str) -> dict[str, Any] | None:
        return self.done.get(key)


def _holder_text(holder: Mapping[str, Any]) -> str:
    """``pid 123 on host h, started 2025-01-01 12:00:00`` from a lock file's body."""
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"


class RunLock:
    """One run at a time in an output folder (module docstring); a context manager, released on
    exit whatever the way out (the end, an error, an interrupt).

    Args:
      folder: the output folder (``output_dir``'s result).
      command: the command, e.g. ``"pyramid bench"``, for the lock file and the messages.
    """

    NAME = ".pyramid.lock"

    def __init__(self, folder: str | Path, command: str) -> None:
        self.path = Path(folder) / self.NAME
        self.command = command
        self.took_over: dict[str, Any] | None = None  # the body of a lock file left by an ended run
        self._fd: int | None = None

    @property
    def took_over_text(self) -> str | None:
        """A note on the lock taken over, or ``None``."""
        if self.took_over is None:
            return None
        return (f"took over the lock {str(self.path)!r} left by {self.took_over.get('command', 'a run')} "
                f"({_holder_text(self.took_over)}), which ended without releasing it")

    def _read(self, fd: int) -> dict[str, Any] | None:
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        try:
            body = json.loads(data)
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def acquire(self) -> RunLock:
        """Take the lock, or raise a ``ConfigError`` naming the run that holds it."""
        if fcntl is None or self._fd is not None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._read(fd)
                os.close(fd)
                who = f"{holder.get('command', 'a run')}, {_holder_text(holder)}" if holder else \
                    "a run whose details are not written yet"
                raise ConfigError(
                    f"{str(self.path.parent)!r} is in use by another run ({who}; lock file "
                    f"{str(self.path)!r}); wait for it to end, stop it, or give another --out") from None
            try:  # a releasing run may have removed the file between our open and our flock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.took_over = self._read(fd)
        body = {"command": self.command, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(body).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing if not held)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)  # while still held: no one locks a file about to vanish
        finally:
            os.close(fd)  # drops the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
