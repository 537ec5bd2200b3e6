"""``pyramid serve``: vLLM's OpenAI-compatible server for the target, with the stages below it
as vLLM's speculative proposer (``serving.proposer``), started from ``--vllm-python``'s
environment and kept in the foreground until Ctrl-C ([serving with vLLM](../../serving.md))."""

from __future__ import annotations

import argparse
import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path

import attrs

from pyramid_core.cli.common import int_at_least, pipeline_args, pipeline_spec
from pyramid_core.errors import ConfigError
from pyramid_core.registry import parse_spec

__all__ = ["configure", "target_dir"]


def configure(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument("--stage", action="append", metavar="STAGE", required=True,
                   help="a stage, smallest first, repeated; the last is the target vLLM serves "
                        "(hf:path=DIR|org/name or smollm2), the others run as vLLM's proposer, e.g. "
                        "--stage smollm2:stage=draft --stage smollm2:stage=qualifier --stage smollm2")
    pipeline_args(p, default_length="4")
    # sampling is each request's (vLLM's); the lower stages draft greedily (serving.proposer)
    p.set_defaults(temperature=0.0, top_k=0, top_p=1.0)
    p.add_argument("--vllm-python", metavar="PATH", default=os.environ.get("PYRAMID_VLLM_PYTHON"),
                   help="the Python of an environment with vLLM and pyramid-core (default $PYRAMID_VLLM_PYTHON)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int_at_least(0), default=8000, help="default 8000; 0: a free port")
    p.add_argument("--device", default="cpu", help="where vLLM and the lower stages run (cpu, cuda; default cpu)")
    p.add_argument("--dtype", default="auto",
                   help="the target's and the lower stages' dtype (auto: bfloat16 where the device computes it natively)")
    p.add_argument("--memory-fraction", type=float, default=None, metavar="F",
                   help="vLLM's gpu_memory_utilization (on a CPU: the share of RAM for its KV cache); "
                        "default 0.3 on a CPU, 0.9 on a GPU")
    p.add_argument("--fixed-length", action="store_true",
                   help="always draft the top block length (default: each step's length, 0 to that, from the "
                        "planner's measured costs; docs/serving.md)")
    p.add_argument("--max-num-seqs", type=int_at_least(1), default=64, help="requests vLLM runs at once (default 64)")
    p.add_argument("--max-model-len", type=int_at_least(16), default=None, help="vLLM's context limit (default: the model's)")
    p.add_argument("--log", metavar="FILE", help="vLLM's output to FILE (default: this terminal)")
    p.add_argument("--print-command", action="store_true",
                   help="print the environment variable and the command that start the server, and exit")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="-- VLLM_ARGS",
                   help="anything after -- goes to vLLM's server as it is")
    return run


def target_dir(spec: str) -> str:
    """The model directory vLLM loads for the target's stage spec: ``hf:path=DIR|org/name`` or
    ``smollm2`` (the target of ``pyramid setup``); anything else is refused with what would do."""
    from pyramid_core.backends.hf.files import smollm2_dir
    from pyramid_core.backends.hf.hub import resolve_model_dir

    name, params = parse_spec(spec)
    extra = sorted(set(params) - {"path", "device", "dtype", "compile", "stage"})
    if name == "hf" and "path" in params and not extra:
        return str(resolve_model_dir(params["path"]))
    if name == "smollm2" and params.get("stage", "target") == "target" and not extra:
        directory = smollm2_dir()
        if not (directory / "config.json").is_file():
            raise ConfigError(f"SmolLM2-135M is not set up in {directory}; run `pyramid setup` first")
        return str(directory)
    why = f" ({', '.join(extra)} cannot be passed to vLLM)" if extra else ""
    raise ConfigError(f"the target {spec!r} is served by vLLM, which loads a model directory{why}: give the last "
                      "--stage as hf:path=DIR, hf:path=org/name or smollm2")


def run(ns: argparse.Namespace) -> int:
    from pyramid_core.backends.hf.loading import resolve_dtype
    from pyramid_core.options import dtype_word
    from pyramid_core.serving.proposer import CHAIN_ENV, PROPOSER_CLASS, LowerChain
    from pyramid_core.serving.server import VllmServer, server_process, stop

    extra = list(ns.vllm_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    dtype = dtype_word(resolve_dtype(ns.dtype, ns.device))
    ns.compile = None
    spec = pipeline_spec(ns, ns.stage, default_length=4, device=ns.device)
    chain, target, k, method = LowerChain.of(spec, max_lanes=ns.max_num_seqs, adaptive=not ns.fixed_length)
    chain = attrs.evolve(chain, device=ns.device, dtype=dtype, compile=None)
    model_dir = target_dir(target)
    if not ns.vllm_python:
        raise ConfigError("--vllm-python PATH (or $PYRAMID_VLLM_PYTHON) is needed: the Python of an environment with "
                          "vLLM and pyramid-core (docs/serving.md says how to make one)")
    speculative = {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": k,
                   "rejection_sample_method": method}
    args = ["--speculative-config", json.dumps(speculative)]
    if ns.max_model_len:
        args += ["--max-model-len", str(ns.max_model_len)]
    fraction = ns.memory_fraction if ns.memory_fraction is not None else (0.3 if ns.device == "cpu" else 0.9)
    server = VllmServer(Path(ns.vllm_python), model_dir, host=ns.host, port=ns.port, device=ns.device, dtype=dtype,
                        memory_fraction=fraction, max_num_seqs=ns.max_num_seqs, served_name=Path(model_dir).name,
                        args=(*args, *extra), env={CHAIN_ENV: chain.to_json()})
    if ns.print_command:
        from pyramid_core.serving.server import vllm_command

        cmd, _ = vllm_command(server, ns.port or 8000)
        print(f"{CHAIN_ENV}={shlex.quote(chain.to_json())} \\\n  {shlex.join(cmd)}")
        return 0
    proc, url, _ = server_process(server, log=ns.log)
    print(f"serving {model_dir} at {url}/v1 (model name {Path(model_dir).name!r}); proposer: "
          f"{' -> '.join(chain.stages)}, {k} tokens per step; Ctrl-C stops it", flush=True)
    try:
        status = proc.wait()
    finally:
        stop(proc)
    if status != 0:
        raise ConfigError(f"vLLM's server exited with status {status}" + (f"; see {ns.log}" if ns.log else ""))
    return 0
