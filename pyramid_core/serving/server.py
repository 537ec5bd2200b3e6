"""vLLM's OpenAI-compatible server, started from the environment that has vLLM (its own
interpreter: vLLM pins its own torch and transformers), waited for, and stopped with its whole
process group. ``pyramid distill corpus --engine vllm`` and ``pyramid serve`` start it here."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import attrs

from pyramid_core.errors import ConfigError

__all__ = ["VllmServer", "free_port", "vllm_command", "running_server"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _path(value: str | Path) -> Path:
    return Path(value).expanduser()


def _strings(value: Sequence[str]) -> tuple[str, ...]:
    return tuple(str(v) for v in value)


@attrs.frozen
class VllmServer:
    """How to start vLLM's server: ``python`` (an interpreter with vLLM), the model directory,
    the address, the dtype, the share of device memory it takes (on a CPU: of RAM) and the
    most requests it runs at once; ``args``: more of vLLM's own options; ``env``: variables
    for its processes. ``threads``: OpenMP threads of its worker on a CPU (``OMP_NUM_THREADS``
    set by the caller wins)."""

    python: Path = attrs.field(converter=_path)
    model_dir: str
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    device: str = "cpu"
    dtype: str = "bfloat16"
    memory_fraction: float = 0.3
    max_num_seqs: int = 256
    seed: int = 0
    served_name: str = "target"
    args: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    env: Mapping[str, str] = attrs.field(factory=dict)
    threads: int | None = None


def vllm_command(server: VllmServer, port: int) -> tuple[list[str], dict[str, str]]:
    """(the command line, the environment) that start ``server`` on ``port``."""
    cmd = [str(server.python), "-m", "vllm.entrypoints.openai.api_server", "--model", server.model_dir,
           "--served-model-name", server.served_name, "--host", server.host, "--port", str(port),
           "--dtype", server.dtype, "--max-num-seqs", str(server.max_num_seqs),
           "--gpu-memory-utilization", str(server.memory_fraction), "--seed", str(server.seed), *server.args]
    env = dict(os.environ) | dict(server.env)
    if server.device == "cpu":
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        if server.threads:
            env.setdefault("OMP_NUM_THREADS", str(server.threads))
    return cmd, env


@contextlib.contextmanager
def running_server(server: VllmServer, *, log: str | Path, startup_seconds: float = 900.0) -> Iterator[str]:
    """Start ``server``, yield its base URL once ``/health`` answers, stop it (SIGTERM to its
    process group, then SIGKILL) on the way out. Its output goes to ``log``; a server that exits
    or does not answer within ``startup_seconds`` is a ``ConfigError`` quoting the log's end."""
    if not server.python.is_file():
        raise ConfigError(f"--vllm-python {server.python}: no such interpreter (the Python of an environment with vLLM)")
    port = server.port or free_port(server.host)
    cmd, env = vllm_command(server, port)
    log_path = Path(log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://{server.host}:{port}"

    def tail() -> str:
        return "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-15:])

    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            if proc.poll() is not None:
                raise ConfigError(f"vLLM's server exited with status {proc.returncode} before it answered "
                                  f"(command: {' '.join(cmd)}); the end of {log_path}:\n{tail()}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ConfigError(f"vLLM's server did not answer within {startup_seconds:.0f} s; the end of {log_path}:\n{tail()}")
            time.sleep(2.0)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL after a minute."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def server_process(server: VllmServer, *, log: str | Path | None) -> tuple[subprocess.Popen[bytes], str, Sequence[str]]:
    """Start ``server`` in its own process group without waiting (``pyramid serve`` in the
    foreground: output to ``log``, or to this terminal when ``None``); (process, URL, command)."""
    if not server.python.is_file():
        raise ConfigError(f"--vllm-python {server.python}: no such interpreter (the Python of an environment with vLLM)")
    port = server.port or free_port(server.host)
    cmd, env = vllm_command(server, port)
    if log is None:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    else:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f"http://{server.host}:{port}", cmd
