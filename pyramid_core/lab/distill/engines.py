"""Where the corpus's text comes from: the target run by a generation engine.

An engine continues batches of token-id prompts and, where it can, returns the target's top-k
next-token distribution at every generated position (``TeacherRows``):

* ``HFEngine`` -- batched Hugging Face ``generate`` of the target in the process, in the dtype it
  was loaded in (bfloat16 where the machine runs it well); rows from the logits it returns.
* ``ServerEngine`` -- any OpenAI-compatible completions server on localhost (or elsewhere) that
  takes token-id prompts and returns top-k log-probabilities (vLLM's ``return_tokens_as_token_ids``
  extension); requests are sent ``concurrency`` at a time so the server batches them.
* ``vllm_server`` starts vLLM's OpenAI-compatible server from its own Python environment on a free
  local port, waits until it answers, and stops it (its whole process group) afterwards.

Rows an engine returns are the server's numerics (vLLM returns the model's log-probabilities
before temperature); ``harvest`` can instead re-read every answer with the target's own stage
(batched prefill), which is what the distilled stages are verified against.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs
import torch
from torch import Tensor

from pyramid_core.errors import ConfigError
from pyramid_core.serving.server import VllmServer, running_server

__all__ = ["Request", "Completion", "Engine", "StreamingEngine", "HFEngine", "ServerEngine", "vllm_server", "top_rows",
           "left_padded", "prefill_rows"]


@attrs.frozen
class Request:
    """One continuation: ``prompt`` token ids, at most ``max_tokens`` new ones, greedy when
    ``temperature`` is 0, sampled with ``seed`` otherwise; generation ends at a token of ``stop``
    (which is kept in the output; at least one)."""

    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    stop: tuple[int, ...] = attrs.field(default=(), validator=attrs.validators.min_len(1))


@attrs.frozen(eq=False)
class Completion:
    """The new tokens; ``logp`` / ``ids`` (``Float16[n k]`` / ``Int32[n k]``, descending) are the
    target's top-k rows at the positions that produced them, ``None`` when the engine gave none;
    ``stopped``: the last token is a stop token."""

    tokens: list[int]
    logp: Tensor | None
    ids: Tensor | None
    stopped: bool


class Engine(Protocol):
    name: str

    def complete(self, requests: Sequence[Request], *, top_k: int) -> list[Completion]:
        """The continuations of ``requests``, in order (top-k rows where the engine has them)."""
        ...


@runtime_checkable
class StreamingEngine(Protocol):
    """An engine that takes requests one at a time (a server): ``submit`` returns at once, and
    the engine keeps its own number of requests in flight."""

    name: str

    def submit(self, request: Request, *, top_k: int) -> Future[Completion]: ...

    def complete(self, requests: Sequence[Request], *, top_k: int) -> list[Completion]: ...


def top_rows(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(top-k log-probabilities as float16, their ids as int32) of ``logits`` ``[..., V]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    return values.to(torch.float16).cpu(), ids.to(torch.int32).cpu()


def left_padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(ids, attention mask) of token lists left-padded to one width, on ``device``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def prefill_rows(model: Any, items: Sequence[tuple[Sequence[int], int, int]], top_k: int, *,
                 batch_tokens: int = 4096) -> list[tuple[Tensor, Tensor]]:
    """The target's top-k rows (as :func:`top_rows`) for each (tokens, start, n): positions
    ``start .. start + n - 1`` of ``tokens`` read in one causal forward (right-padded batches of
    about ``batch_tokens``)."""
    vocab = int(model.config.vocab_size)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    out: list[tuple[Tensor, Tensor] | None] = [None] * len(items)
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * len(items[order[j]][0]) <= batch_tokens:
            j += 1
        chunk = order[i:j]
        width = max(len(items[k][0]) for k in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, k in enumerate(chunk):
            toks = items[k][0]
            ids[r, : len(toks)] = torch.tensor(list(toks), dtype=torch.long)
            mask[r, : len(toks)] = 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        for r, k in enumerate(chunk):
            _, start, n = items[k]
            out[k] = top_rows(logits[r, start: start + n, :vocab], top_k)
        i = j
    return [r for r in out if r is not None]


def _cut(tokens: list[int], stop: Sequence[int]) -> tuple[list[int], bool]:
    for j, t in enumerate(tokens):
        if t in stop:
            return tokens[: j + 1], True
    return tokens, False


class HFEngine:
    """Batched ``generate`` of a Hugging Face causal LM (left-padded; one batch of up to
    ``batch_size`` requests of equal temperature at a time)."""

    name = "hf"

    def __init__(self, model: Any, *, batch_size: int = 64, pad_id: int = 0) -> None:
        self.model = model
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.vocab = int(model.config.vocab_size)

    @torch.inference_mode()
    def complete(self, requests: Sequence[Request], *, top_k: int) -> list[Completion]:
        out: list[Completion | None] = [None] * len(requests)
        groups: dict[tuple[float, int, tuple[int, ...]], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.temperature, r.max_tokens, r.stop), []).append(i)
        for (temperature, max_tokens, stop), members in groups.items():
            members.sort(key=lambda i: len(requests[i].prompt))
            for b in range(0, len(members), self.batch_size):
                chunk = members[b: b + self.batch_size]
                for i, c in zip(chunk, self._generate([requests[i] for i in chunk], temperature, max_tokens, stop, top_k),
                                strict=True):
                    out[i] = c
        return [c for c in out if c is not None]

    def _generate(self, batch: Sequence[Request], temperature: float, max_tokens: int, stop: tuple[int, ...],
                  top_k: int) -> list[Completion]:
        ids, mask = left_padded([r.prompt for r in batch], self.pad_id, self.model.device)
        width = ids.shape[1]
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "return_dict_in_generate": True, "output_logits": True,
                                  "pad_token_id": self.pad_id, "top_k": None, "top_p": None,
                                  "eos_token_id": list(stop)}
        if temperature > 0:
            torch.manual_seed(batch[0].seed)  # one generator for the batch: seeded by its first request
            kwargs |= {"do_sample": True, "temperature": temperature}
        else:
            kwargs |= {"do_sample": False, "temperature": None}
        gen = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        logits = torch.stack(gen.logits, dim=1)[..., : self.vocab]
        new = gen.sequences[:, width:].cpu().tolist()
        result = []
        for i, row in enumerate(new):
            toks, stopped = _cut(row, stop)
            logp, top = top_rows(logits[i, : len(toks)], top_k)
            result.append(Completion(toks, logp, top, stopped))
        return result


def _token_id(text: str) -> int:
    if not text.startswith("token_id:"):
        raise ConfigError(f"the completions server returned token {text!r}, not 'token_id:N'; it must support "
                          "return_tokens_as_token_ids (vLLM does)")
    return int(text[len("token_id:"):])


class ServerEngine:
    """An OpenAI-compatible completions server (``base_url`` like ``http://127.0.0.1:8000``):
    token-id prompts in, token ids and top-k log-probabilities out, ``concurrency`` requests in
    flight at a time."""

    name = "server"

    def __init__(self, base_url: str, *, concurrency: int = 64, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.concurrency = concurrency
        self.timeout = timeout
        self._pool: ThreadPoolExecutor | None = None
        models = self._call("GET", "/v1/models")
        try:
            self.model = str(models["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise ConfigError(f"{self.base_url}/v1/models lists no model: {str(models)[:200]}") from None

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise ConfigError(f"completions server {self.base_url}{path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(f"completions server {self.base_url} did not answer {path}: {exc}") from None

    def _one(self, r: Request, top_k: int) -> Completion:
        # no per-request seed: vLLM's CPU build fails on seeded requests whose prefill is split
        # into chunks ("CPU Generator does not use offset"); sampling follows the server's --seed
        body = {"model": self.model, "prompt": list(r.prompt), "max_tokens": r.max_tokens, "temperature": r.temperature,
                "logprobs": top_k, "return_tokens_as_token_ids": True, "stop_token_ids": list(r.stop),
                "skip_special_tokens": False}
        choice = self._call("POST", "/v1/completions", body)["choices"][0]
        lp = choice.get("logprobs") or {}
        tokens = [_token_id(t) for t in lp.get("tokens") or []]
        tops = lp.get("top_logprobs") or []
        if len(tops) != len(tokens):
            raise ConfigError(f"completions server {self.base_url}: {len(tokens)} tokens but {len(tops)} top-logprob rows")
        rows = []
        for top in tops:
            pairs = sorted(((_token_id(t), float(v)) for t, v in (top or {}).items()), key=lambda p: -p[1])[:top_k]
            if len(pairs) < top_k:
                raise ConfigError(f"completions server {self.base_url} returned {len(pairs)} log-probabilities per "
                                  f"position, fewer than top_k = {top_k} (vLLM: raise --max-logprobs)")
            rows.append(pairs)
        toks, stopped = _cut(tokens, r.stop)
        if not stopped and choice.get("finish_reason") == "stop":
            stopped = True  # a server that leaves the stop token out of its output
        rows = rows[: len(toks)]
        logp = torch.tensor([[v for _, v in row] for row in rows], dtype=torch.float16).reshape(len(rows), top_k)
        ids = torch.tensor([[t for t, _ in row] for row in rows], dtype=torch.int32).reshape(len(rows), top_k)
        return Completion(toks, logp, ids, stopped)

    def submit(self, request: Request, *, top_k: int) -> Future[Completion]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, self.concurrency), thread_name_prefix="completions")
        return self._pool.submit(self._one, request, top_k)

    def complete(self, requests: Sequence[Request], *, top_k: int) -> list[Completion]:
        return [f.result() for f in [self.submit(r, top_k=top_k) for r in requests]]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


@contextlib.contextmanager
def vllm_server(python: str | Path, model_dir: str | Path, *, log: str | Path, device: str = "cpu", dtype: str = "bfloat16",
                max_logprobs: int = 32, memory_fraction: float = 0.3, max_num_seqs: int = 256, seed: int = 0,
                threads: int | None = None, startup_seconds: float = 900.0) -> Iterator[str]:
    """vLLM's server for the corpus (``serving.server.running_server``) on a free port of
    127.0.0.1, returning up to ``max_logprobs`` log-probabilities per token, without stats logs;
    yields its base URL and stops it on the way out."""
    server = VllmServer(python, str(model_dir), device=device, dtype=dtype, memory_fraction=memory_fraction,
                        max_num_seqs=max_num_seqs, seed=seed, threads=threads,
                        args=("--max-logprobs", str(max_logprobs), "--disable-log-stats"))
    with running_server(server, log=log, startup_seconds=startup_seconds) as url:
        yield url
