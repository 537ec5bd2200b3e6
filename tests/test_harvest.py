"""The corpus at scale (``lab.distill.harvest``) and its engines (``lab.distill.engines``).

A tiny random Llama stands in for the target, behind the in-process engine and behind a small
OpenAI-compatible server written here (the completions API subset vLLM serves: token-id prompts,
``logprobs``, ``return_tokens_as_token_ids``), so the client, the shards, the budget and the
resumption are checked without vLLM. vLLM itself is exercised by ``nox -s vllm``.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from pyramid_core import ConfigError
from pyramid_core.backends.hf.tiny import tiny_llama, word_tokenizer
from pyramid_core.lab.distill.corpus import corpus_hash, load_corpus
from pyramid_core.lab.distill.engines import (
    HFEngine,
    Request,
    ServerEngine,
    prefill_rows,
    vllm_server,
)
from pyramid_core.lab.distill.harvest import HarvestConfig, harvest

VOCAB = 64
CHAT = "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w3 {% endif %}"


@pytest.fixture(scope="module")
def target() -> Any:
    return tiny_llama(7, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def tok() -> Any:
    t = word_tokenizer([f"w{i}" for i in range(VOCAB)])
    t.chat_template = CHAT
    t.eos_token = "w63"
    return t


class _Handler(BaseHTTPRequestHandler):
    model: Any = None
    top_limit = 8
    lock = threading.Lock()

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"data": [{"id": "tiny"}]} if self.path == "/v1/models" else {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        k = int(body["logprobs"])
        if k > self.top_limit:
            self._send(400, {"error": {"message": f"logprobs {k} > max_logprobs {self.top_limit}"}})
            return
        stop = body["stop_token_ids"]
        with self.lock, torch.inference_mode():
            engine = HFEngine(self.model)
            c = engine.complete([Request(tuple(body["prompt"]), body["max_tokens"], body["temperature"], 0, tuple(stop))],
                                top_k=k)[0]
        rows = [{f"token_id:{int(i)}": float(v) for i, v in zip(ids, lp, strict=True)}
                for ids, lp in zip(c.ids.tolist(), c.logp.tolist(), strict=True)]  # type: ignore[union-attr]
        self._send(200, {"choices": [{"finish_reason": "stop" if c.stopped else "length", "logprobs": {
            "tokens": [f"token_id:{t}" for t in c.tokens], "top_logprobs": rows}}]})


@pytest.fixture
def server(target: Any) -> Iterator[str]:
    handler = type("Handler", (_Handler,), {"model": target, "top_limit": 8})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def requests(n: int = 5) -> list[Request]:
    return [Request((1, 5 + i, 9, 2, 3), 12, 0.0, i, (63,)) for i in range(n)]


def test_server_engine_returns_what_the_target_generates(target: Any, server: str) -> None:
    local = HFEngine(target, batch_size=2).complete(requests(), top_k=8)
    remote = ServerEngine(server, concurrency=3).complete(requests(), top_k=8)
    for a, b in zip(local, remote, strict=True):
        assert a.tokens == b.tokens and 0 < len(a.tokens) <= 12 and a.stopped == b.stopped
        assert torch.equal(a.ids, b.ids)  # type: ignore[arg-type]
        torch.testing.assert_close(a.logp, b.logp)


def test_engine_rows_are_the_targets_prefill_rows(target: Any) -> None:
    done = HFEngine(target).complete(requests(3), top_k=8)
    rows = prefill_rows(target, [(list(r.prompt) + c.tokens, len(r.prompt) - 1, len(c.tokens))
                                 for r, c in zip(requests(3), done, strict=True)], 8)
    for c, (logp, ids) in zip(done, rows, strict=True):
        assert torch.equal(c.ids[:, 0], ids[:, 0])  # type: ignore[index]
        torch.testing.assert_close(c.logp.float(), logp.float(), atol=2e-3, rtol=0)  # type: ignore[union-attr]


def test_server_errors_name_the_fix(server: str) -> None:
    with pytest.raises(ConfigError, match="max_logprobs 8"):
        ServerEngine(server).complete(requests(1), top_k=9)
    with pytest.raises(ConfigError, match="did not answer"):
        ServerEngine("http://127.0.0.1:9", timeout=2)


def test_a_request_needs_a_stop_token() -> None:
    with pytest.raises(ValueError):
        Request((1, 2), 4)


def cfg(**kw: Any) -> HarvestConfig:
    return HarvestConfig(**{"positions": 400, "shard_prompts": 6, "new_tokens": 10, "python_windows": 1, "window": 16,
                            "self_instruct_tokens": 12, "top_k": 8, "follow_up": 0.5, "templated_fraction": 0.5} | kw)


def test_harvest_fills_the_budget_in_shards_and_resumes(target: Any, tok: Any, tmp_path: Path) -> None:
    engine = HFEngine(target, batch_size=4)
    whole = harvest(engine, target, tok, tmp_path / "a", cfg(), progress=False)
    assert whole["target_positions"] >= 400 and whole["shards"] >= 2
    seqs = load_corpus(tmp_path / "a")
    assert sum(s.n_targets for s in seqs) == whole["target_positions"] == sum(whole["by_source"].values())
    assert whole["by_source"]["python"] > 0 and whole["prompts"]["second_turns"] > 0
    for s in seqs:  # every stored row is the target's own row at its position
        if s.source == "greedy":
            assert s.rows.ids[:, 0].tolist() == s.tokens[s.start + 1: s.start + 1 + s.n_targets]
    # killed after one shard, then the same command: the same corpus, shard for shard
    assert harvest(engine, target, tok, tmp_path / "b", cfg(), progress=False, max_shards=1) == {}
    (tmp_path / "b" / "shard-00001.json").write_text("{}")  # a record written, its shard not: rebuilt
    resumed = harvest(engine, target, tok, tmp_path / "b", cfg(), progress=False)
    assert resumed["sha256"] == whole["sha256"] == corpus_hash(load_corpus(tmp_path / "b"))
    # a larger budget extends it; another recipe is refused
    more = harvest(engine, target, tok, tmp_path / "b", cfg(positions=700), progress=False)
    assert more["target_positions"] >= 700 and more["shards"] > whole["shards"]
    with pytest.raises(ConfigError, match="another recipe"):
        harvest(engine, target, tok, tmp_path / "b", cfg(new_tokens=11), progress=False)


def test_harvest_never_trains_on_held_out_or_repeated_prompts(target: Any, tok: Any, tmp_path: Path) -> None:
    engine = HFEngine(target, batch_size=8)
    first = tmp_path / "first"
    harvest(engine, target, tok, first, cfg(), progress=False)
    records = [json.loads(p.read_text()) for p in sorted(first.glob("shard-*.json"))]
    prompts = [p["prompt"] for r in records for p in r["prompts"]]
    assert len(prompts) == len(set(prompts))
    held = prompts[:5]
    harvest(engine, target, tok, tmp_path / "second", cfg(), held_out=held, progress=False)
    again = [p["prompt"] for f in (tmp_path / "second").glob("shard-*.json") for p in json.loads(f.read_text())["prompts"]]
    assert again and not set(again) & set(held)


def test_harvest_through_a_server_with_prefill_rows(target: Any, tok: Any, server: str, tmp_path: Path) -> None:
    manifest = harvest(ServerEngine(server, concurrency=4), target, tok, tmp_path, cfg(positions=150, teacher="prefill"),
                       progress=False, engine_info={"name": "server"})
    assert manifest["target_positions"] >= 150 and manifest["engine"] == {"name": "server"}
    assert manifest["positions_per_second"] > 0


@pytest.mark.parametrize("bad", [{"teacher": "other"}, {"follow_up": 1.5}, {"positions": 0}])
def test_bad_recipes_are_named(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(bad))):
        cfg(**bad)


def test_a_server_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'no module named vllm' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with (pytest.raises(ConfigError, match="(?s)exited with status 3.*no module named vllm"),
          vllm_server(fake, tmp_path, log=tmp_path / "log.txt", startup_seconds=30)):
        pass
    with pytest.raises(ConfigError, match="no such interpreter"), vllm_server(tmp_path / "missing", tmp_path, log=tmp_path / "log.txt"):
        pass


@pytest.mark.parametrize(("args", "message"), [
    (["--engine", "server"], "--server URL"),
    (["--engine", "vllm", "--vllm-python", ""], "--vllm-python"),
])
def test_cli_names_what_an_engine_needs(args: list[str], message: str, tmp_path: Path, capsys: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from pyramid_core.cli import main

    monkeypatch.delenv("PYRAMID_VLLM_PYTHON", raising=False)
    assert main(["distill", "corpus", "--positions", "10", "--workdir", str(tmp_path), *args]) != 0
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


class BatchOnly:
    """The same server without ``submit``: the shard is built phase by phase."""

    name = "server"

    def __init__(self, inner: ServerEngine) -> None:
        self.inner = inner

    def complete(self, requests: list[Request], *, top_k: int) -> list[Any]:
        return self.inner.complete(requests, top_k=top_k)


def test_streamed_shards_equal_shards_built_phase_by_phase(target: Any, tok: Any, server: str, tmp_path: Path) -> None:
    """Second turns sent as soon as their first turn ends (a server) give the corpus that waiting
    for every first turn gives: each draw is made in prompt order."""
    streamed = ServerEngine(server, concurrency=5)
    a = harvest(streamed, target, tok, tmp_path / "a", cfg(positions=250), progress=False)
    b = harvest(BatchOnly(streamed), target, tok, tmp_path / "b", cfg(positions=250), progress=False)
    streamed.close()
    assert a["sha256"] == b["sha256"] and a["prompts"]["second_turns"] > 0


# Passage prompts: the tiny target writes noise, so an engine that writes a fixed passage stands in
# for the target where it is asked for one (its rows then come from the target's prefill).
PASSAGE = ("the garden library opens at nine . visitors borrow twelve books . " * 4).strip()
WORDS = ["unk", "w1", "w2", "w3", "w63", "the", "garden", "library", "opens", "at", "nine", ".", "visitors",
         "borrow", "twelve", "books"]


class _PassageWriter:
    """``HFEngine`` except that a request for a passage (a prompt of ``passages.GENRES``) gets ``PASSAGE``."""

    name = "passages"

    def __init__(self, inner: HFEngine, tokenizer: Any) -> None:
        self.inner, self.tokenizer, self.asked = inner, tokenizer, 0

    def complete(self, requests: Any, *, top_k: int) -> list[Any]:
        from pyramid_core.lab.distill.engines import Completion

        out = self.inner.complete(requests, top_k=top_k)
        stop = int(self.tokenizer.convert_tokens_to_ids("w63"))
        for i, r in enumerate(requests):
            # a genre prompt is written in words the tokenizer lacks: mostly unknown tokens, no w-words
            if r.temperature > 0 and r.prompt.count(0) >= 3 and r.max_tokens > 12:
                self.asked += 1
                ids = list(self.tokenizer(PASSAGE, add_special_tokens=False)["input_ids"]) + [stop]
                out[i] = Completion(ids, None, None, True)
        return out


def test_passage_prompts_are_tasks_over_the_passages_the_target_wrote(target: Any, tmp_path: Path) -> None:
    from pyramid_core.lab.distill.passages import TASKS

    tok = word_tokenizer(WORDS + [f"x{i}" for i in range(VOCAB - len(WORDS))])
    tok.chat_template = CHAT
    tok.eos_token = "w63"
    engine = _PassageWriter(HFEngine(target, batch_size=8), tok)
    c = cfg(positions=300, shard_prompts=8, new_tokens=40, templated_fraction=0.25, passage_fraction=0.5, follow_up=0.0)
    manifest = harvest(engine, target, tok, tmp_path, c, progress=False)
    assert engine.asked > 0
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("shard-*.json"))]
    tasks = [p for r in records for p in r["prompts"] if "the garden library opens at nine ." in p["prompt"]]
    assert len(tasks) == 4 * len(records)  # half of each shard's 8 prompts
    assert {p["kind"] for p in tasks} <= set(TASKS) and len({p["kind"] for p in tasks}) >= 3
    assert all(r["passages_written"] >= 4 for r in records)
    # the written passages are training sequences too, with the target's rows
    passage_ids = tok(PASSAGE, add_special_tokens=False)["input_ids"]
    written = [s for s in load_corpus(tmp_path) if s.source == "sampled" and s.tokens[s.start + 1:][:len(passage_ids)] == passage_ids]
    assert len(written) >= sum(r["passages_written"] for r in records)
    assert manifest["target_positions"] >= 300
    # the recipe pins the share; a recipe without passages reads as before they existed
    assert c.recipe()["passage_fraction"] == 0.5 and "passage_fraction" not in cfg().recipe()


def test_passage_tasks_quote_the_passage() -> None:
    import random

    from pyramid_core.lab.distill.passages import passage_task, trim_passage

    text = "Anna Berg opens the Larchfield library on Monday. It holds 12,000 books! Visitors need a card"
    assert trim_passage(text, min_words=5) == "Anna Berg opens the Larchfield library on Monday. It holds 12,000 books!"
    assert trim_passage("too short.") is None and trim_passage("no sentence end " * 20) is None
    rng = random.Random(0)
    passage = trim_passage(text, min_words=5)
    assert passage is not None
    for kind in ("summarisation", "retrieval", "qa", "chat"):
        for _ in range(6):
            task = passage_task(kind, passage, rng)
            assert passage in task or "\"" in task
    for _ in range(6):
        task = passage_task("translation", passage, rng)
        assert task.split("\n")[-1] in passage and "Translate" in task


def test_bad_passage_shares_are_named() -> None:
    with pytest.raises(ConfigError, match="passage_fraction"):
        cfg(passage_fraction=1.5)
    with pytest.raises(ConfigError, match="passage_fraction"):
        cfg(templated_fraction=0.6, passage_fraction=0.6)
