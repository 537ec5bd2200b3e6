"""The corpus at scale: ``pyramid distill corpus --positions N`` (sharded, seeded, resumable).

Where ``corpus.build_corpus`` answers one fixed prompt list, ``harvest`` keeps writing shards until
the corpus holds ``positions`` target positions. Shard ``i`` is a function of (seed, i):

1. **prompts** -- ``templated_fraction`` of them from the templates (``corpus.training_prompts``,
   with the shard's own numbers), the rest written by the target itself through the engine (a user
   turn of its chat template opened with an opener of one of the six task kinds, sampled at
   ``self_instruct_temperature``: ``corpus._OPENERS``), and ``passage_fraction`` of them task prompts
   over passages the target writes first (``passages``: summarise, question, translate or edit the
   passage; the written passages are kept as sampled sequences); a prompt equal to a held-out prompt
   or to one of an earlier shard is dropped;
2. **answers** -- every prompt answered greedily and sampled at ``sample_temperature``;
3. **second turns** -- ``follow_up`` of the greedy answers get a second user turn (a follow-up of
   its kind) answered greedily with the first turn in the history, as Spec-Bench's multi-turn
   questions are;
4. **teacher rows** -- the target's top-``k`` rows at every answered position: the engine's own
   (``teacher="engine"``) or re-read by the target in the process by batched prefill
   (``teacher="prefill"``, in the dtype it was loaded in);
5. **teacher-forced text** -- ``python_windows`` windows of Python's standard library sources, read
   by the in-process target.

A shard is written atomically (``shard-NNNNN.pt``, the format ``corpus.load_corpus`` reads) with
its record (``shard-NNNNN.json``: prompts, positions, seconds); a killed run loses at most the
shard it was writing, and the same command resumes. ``harvest.json`` pins the recipe (a different
one is refused); a larger ``positions`` extends a finished corpus. ``corpus.json`` is written when
the budget is reached.
"""

from __future__ import annotations

import json
import random
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from pyramid_core.errors import ConfigError
from pyramid_core.lab.distill.corpus import (
    _OPENERS,
    _TOPICS,
    CORPUS_MANIFEST,
    TeacherRows,
    TrainSequence,
    _user_turn,
    corpus_hash,
    load_corpus,
    training_prompts,
)
from pyramid_core.lab.distill.engines import (
    Completion,
    Engine,
    Request,
    StreamingEngine,
    prefill_rows,
)
from pyramid_core.lab.distill.passages import GENRES, TASKS, passage_task, trim_passage
from pyramid_core.lab.prompts import encode_prompt

__all__ = ["HarvestConfig", "harvest", "FOLLOW_UPS"]

RECIPE = "harvest.json"

# Second user turns, per task kind (Spec-Bench's multi-turn questions ask the like of these).
FOLLOW_UPS: dict[str, tuple[str, ...]] = {
    "chat": ("Thanks! Can you give me one more idea?", "Could you make that shorter?", "Why do you think so?",
             "Can you rewrite that in a more formal tone?"),
    "translation": ("Now translate it back into English.", "How would you say it more informally?",
                    "Explain the grammar of your translation."),
    "summarisation": ("Now summarise it in one sentence.", "Which point is the most important, and why?",
                      "Turn your summary into three bullet points."),
    "qa": ("Can you give an example?", "Explain that to a ten-year-old.", "What is a common mistake people make about this?",
           "Where could I read more about it?"),
    "maths": ("Check your answer another way.", "What if the numbers were doubled?", "Explain the second step in more detail."),
    "retrieval": ("Quote the sentence that supports your answer.", "What else does the passage say?",
                  "Answer again in one short sentence."),
}


@attrs.frozen
class HarvestConfig:
    positions: int = 5_000_000  # stop once the corpus holds this many target positions
    shard_prompts: int = 256  # prompts per shard (each answered greedily and sampled)
    new_tokens: int = 160  # per answer
    sample_temperature: float = 0.8
    follow_up: float = 0.3  # share of greedy answers that get a second turn
    templated_fraction: float = 0.2  # share of prompts from templates; the rest the target writes
    passage_fraction: float = 0.0  # share of prompts that are tasks over a passage the target wrote
    self_instruct_tokens: int = 48
    self_instruct_temperature: float = 1.0
    python_windows: int = 8  # windows of Python sources per shard, teacher-forced
    window: int = 256
    top_k: int = 32
    teacher: str = "engine"  # "engine" | "prefill"
    chat: bool = True
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if self.teacher not in ("engine", "prefill"):
            raise ConfigError(f"teacher {self.teacher!r}: expected 'engine' or 'prefill'")
        for name in ("positions", "shard_prompts", "new_tokens", "top_k", "window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"harvest: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("follow_up", "templated_fraction", "passage_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"harvest: {name} must lie in [0, 1], got {getattr(self, name)}")
        if self.templated_fraction + self.passage_fraction > 1.0:
            raise ConfigError(f"harvest: templated_fraction + passage_fraction must be at most 1, got "
                              f"{self.templated_fraction} + {self.passage_fraction}")

    def recipe(self) -> dict[str, Any]:
        """Everything that fixes a shard's content (``positions`` only says how many; a
        ``passage_fraction`` of 0 is left out, so corpora built before it existed still resume)."""
        return {k: v for k, v in attrs.asdict(self).items()
                if k != "positions" and not (k == "passage_fraction" and v == 0.0)}


def _python_windows(tokenizer: Any, rng: random.Random, count: int, window: int) -> list[list[int]]:
    """``count`` windows of ``window`` tokens from standard-library sources chosen with ``rng``."""
    if count <= 0:
        return []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and p.stat().st_size > 4000)
    if not files:
        raise ConfigError(f"no Python sources found in {stdlib}")
    out: list[list[int]] = []
    while len(out) < count:
        text = rng.choice(files).read_text(encoding="utf-8", errors="replace")
        at = rng.randrange(0, max(1, len(text) - 6 * window))
        ids = tokenizer(text[at: at + 6 * window], add_special_tokens=False)["input_ids"]
        if len(ids) >= window // 2:
            out.append(list(ids[:window]))
    return out


class _Shard:
    """Builds shard ``index`` (one call of ``build``)."""

    def __init__(self, index: int, cfg: HarvestConfig, engine: Engine, model: Any, tokenizer: Any, seen: set[str]) -> None:
        # seen: the held-out prompts and every prompt of earlier shards (never answered again)
        self.index, self.cfg, self.engine, self.model, self.tokenizer = index, cfg, engine, model, tokenizer
        self.seen = seen
        self.rng = random.Random(cfg.seed * 1_000_003 + index)
        self.prefix, ends = _user_turn(tokenizer)
        self.stop = tuple(sorted(ends))
        self.written: list[tuple[list[int], Completion]] = []  # the passages the target wrote (sampled answers)

    def _seed(self) -> int:
        return self.rng.randrange(2**31)

    def prompts(self) -> list[tuple[str, str]]:
        cfg, rng = self.cfg, self.rng
        templated = training_prompts(cfg.seed * 1_000_003 + self.index)
        n_templated = round(cfg.shard_prompts * cfg.templated_fraction)
        chosen = [p for p in rng.sample(templated, min(n_templated, len(templated))) if p[1] not in self.seen]
        kinds = list(_OPENERS)
        n_passages = round(cfg.shard_prompts * cfg.passage_fraction)
        want = cfg.shard_prompts - len(chosen) - n_passages
        tries = 0
        while want > 0 and tries < 4:  # the target's own prompts, topped up when some are dropped
            tries += 1
            openers = [(kinds[(len(chosen) + i) % len(kinds)], "") for i in range(want + want // 2 + 1)]
            openers = [(k, rng.choice(_OPENERS[k])) for k, _ in openers]
            opener_ids = [list(self.tokenizer(o, add_special_tokens=False)["input_ids"]) for _, o in openers]
            reqs = [Request(tuple(self.prefix + ids), cfg.self_instruct_tokens, cfg.self_instruct_temperature,
                            self._seed(), self.stop) for ids in opener_ids]
            for (kind, _), ids, c in zip(openers, opener_ids, self.engine.complete(reqs, top_k=1), strict=True):
                if not c.stopped or want <= 0:
                    continue
                body = c.tokens[:-1]
                text = self.tokenizer.decode(ids + body, skip_special_tokens=True).strip()
                if len(self.tokenizer.decode(body, skip_special_tokens=True).split()) < 3 or text in self.seen:
                    continue
                self.seen.add(text)
                chosen.append((kind, text))
                want -= 1
        if n_passages:
            chosen += self._passage_prompts(n_passages)
        for _, text in chosen:
            self.seen.add(text)
        return chosen

    def _passage_prompts(self, n: int) -> list[tuple[str, str]]:
        """Up to ``n`` task prompts over passages the target writes now (a quarter more are
        written, as some end too short; every written passage is kept in ``self.written``)."""
        cfg, rng = self.cfg, self.rng
        asks = [rng.choice(GENRES).format(t=rng.choice(_TOPICS)) for _ in range(n + n // 4 + 1)]
        encoded = [encode_prompt(self.tokenizer, a, cfg.chat) for a in asks]
        reqs = [Request(tuple(e), cfg.new_tokens, cfg.sample_temperature, self._seed(), self.stop) for e in encoded]
        kinds = list(TASKS)
        out: list[tuple[str, str]] = []
        for e, c in zip(encoded, self.engine.complete(reqs, top_k=cfg.top_k), strict=True):
            if not c.tokens:
                continue
            self.written.append((e, c))
            passage = trim_passage(self.tokenizer.decode(c.tokens, skip_special_tokens=True))
            if passage is None or len(out) == n:
                continue
            kind = kinds[len(out) % len(kinds)]
            text = passage_task(kind, passage, rng)
            if text not in self.seen:
                self.seen.add(text)
                out.append((kind, text))
        return out

    def _conversation(self, turns: Sequence[tuple[str, str]]) -> list[int]:
        if not (self.cfg.chat and getattr(self.tokenizer, "chat_template", None)):
            return list(self.tokenizer("\n".join(t for _, t in turns))["input_ids"])
        ids = self.tokenizer.apply_chat_template([{"role": r, "content": t} for r, t in turns], add_generation_prompt=True)
        return list(ids if isinstance(ids, list) else ids["input_ids"])

    def build(self) -> tuple[list[TrainSequence], dict[str, Any]]:
        cfg = self.cfg
        t0 = time.perf_counter()
        prompts = self.prompts()
        encoded = [encode_prompt(self.tokenizer, p, cfg.chat) for _, p in prompts]
        reqs = [Request(tuple(e), cfg.new_tokens, 0.0, self._seed(), self.stop) for e in encoded]
        reqs += [Request(tuple(e), cfg.new_tokens, cfg.sample_temperature, self._seed(), self.stop) for e in encoded]
        # second turns: the greedy answer in the history, a follow-up of the prompt's kind
        # (every draw made here, in prompt order, whatever order the answers come back in)
        second = [i for i in range(len(prompts)) if self.rng.random() < cfg.follow_up]
        follow = {i: (self.rng.choice(FOLLOW_UPS[prompts[i][0]]), self._seed()) for i in second}

        def again(i: int, answer: Completion) -> tuple[list[int], Request]:
            text, (question, seed) = prompts[i][1], follow[i]
            reply = self.tokenizer.decode(answer.tokens, skip_special_tokens=True).strip()
            conv = self._conversation([("user", text), ("assistant", reply), ("user", question)])
            return conv, Request(tuple(conv), cfg.new_tokens, 0.0, seed, self.stop)

        convs: list[list[int]] = []
        if isinstance(self.engine, StreamingEngine):  # a second turn is sent as soon as its first ends
            futures = [self.engine.submit(r, top_k=cfg.top_k) for r in reqs]
            answers, later = [], []
            for i, f in enumerate(futures):
                answers.append(f.result())
                if i in follow:
                    conv, r = again(i, answers[-1])
                    convs.append(conv)
                    later.append(self.engine.submit(r, top_k=cfg.top_k))
            replies = [f.result() for f in later]
        else:
            answers = self.engine.complete(reqs, top_k=cfg.top_k)
            turns = [again(i, answers[i]) for i in second]
            convs = [c for c, _ in turns]
            replies = self.engine.complete([r for _, r in turns], top_k=cfg.top_k) if turns else []
        pending: list[tuple[str, list[int], int, Completion]] = []
        for mode, offset in (("greedy", 0), ("sampled", len(encoded))):
            pending += [(mode, e, len(e) - 1, answers[offset + i]) for i, e in enumerate(encoded)]
        pending += [("greedy", c, len(c) - 1, a) for c, a in zip(convs, replies, strict=True)]
        pending += [("sampled", e, len(e) - 1, c) for e, c in self.written]
        pending = [p for p in pending if p[3].tokens]
        if cfg.teacher == "engine" and all(p[3].logp is not None for p in pending):
            rows = [TeacherRows(p[3].logp, p[3].ids) for p in pending]  # type: ignore[arg-type]
        else:
            rows = [TeacherRows(*r) for r in prefill_rows(
                self.model, [(ctx + a.tokens, start, len(a.tokens)) for _, ctx, start, a in pending], cfg.top_k)]
        seqs = [TrainSequence(mode, ctx + a.tokens, start, r) for (mode, ctx, start, a), r in zip(pending, rows, strict=True)]
        windows = _python_windows(self.tokenizer, self.rng, cfg.python_windows, cfg.window)
        if windows:
            read = prefill_rows(self.model, [(w, 0, len(w) - 1) for w in windows], cfg.top_k)
            seqs += [TrainSequence("python", w, 0, TeacherRows(*r)) for w, r in zip(windows, read, strict=True)]
        record = {
            "prompts": [{"kind": k, "prompt": p} for k, p in prompts],
            "second_turns": len(convs),
            "passages_written": len(self.written),
            "positions": sum(s.n_targets for s in seqs),
            "by_source": {src: sum(s.n_targets for s in seqs if s.source == src) for src in ("greedy", "sampled", "python")},
            "seconds": round(time.perf_counter() - t0, 2),
            "engine": self.engine.name,
        }
        return seqs, record


def _save(out: Path, index: int, seqs: list[TrainSequence], record: dict[str, Any]) -> None:
    shard = out / f"shard-{index:05d}.pt"
    tmp = shard.with_suffix(".tmp")
    torch.save([attrs.asdict(s, recurse=False) | {"rows": attrs.asdict(s.rows)} for s in seqs], tmp)
    meta = out / f"shard-{index:05d}.json"
    meta.with_suffix(".tmp.json").write_text(json.dumps(record) + "\n")
    meta.with_suffix(".tmp.json").replace(meta)  # the record first: a shard without one is rebuilt
    tmp.replace(shard)


def _records(out: Path) -> dict[int, dict[str, Any]]:
    done = {}
    for meta in sorted(out.glob("shard-*.json")):
        index = int(meta.stem.split("-")[1])
        if (out / f"shard-{index:05d}.pt").is_file():
            done[index] = json.loads(meta.read_text())
    return done


def harvest(engine: Engine, model: Any, tokenizer: Any, out_dir: str | Path, cfg: HarvestConfig, *,
            held_out: Sequence[str] = (), engine_info: dict[str, Any] | None = None, progress: bool = True,
            max_shards: int | None = None) -> dict[str, Any]:
    """Write shards into ``out_dir`` until it holds ``cfg.positions`` target positions (or this
    run has written ``max_shards``); return ``corpus.json``'s content (``{}`` if the budget is
    not yet reached). ``model``/``tokenizer`` are the target in the process (prefill rows and
    Python windows); ``engine`` generates."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe_path = out / RECIPE
    if recipe_path.is_file():
        saved = json.loads(recipe_path.read_text())
        if saved != cfg.recipe():
            raise ConfigError(f"{out} holds a corpus of another recipe ({saved}); use another --corpus folder "
                              "(only --positions may change between runs)")
    elif any(out.glob("shard-*.pt")):
        raise ConfigError(f"{out} holds shards of another builder (no {RECIPE}); use another --corpus folder")
    else:
        recipe_path.write_text(json.dumps(cfg.recipe(), indent=2) + "\n")
    done = _records(out)
    seen = set(held_out) | {p["prompt"] for r in done.values() for p in r["prompts"]}
    total = sum(r["positions"] for r in done.values())
    bar = tqdm(total=cfg.positions, initial=min(total, cfg.positions), desc="corpus", unit="pos", unit_scale=True,
               disable=not progress, smoothing=0.1)
    index, written = 0, 0
    while total < cfg.positions and (max_shards is None or written < max_shards):
        if index not in done:
            seqs, record = _Shard(index, cfg, engine, model, tokenizer, seen).build()
            _save(out, index, seqs, record)
            done[index] = record
            total += record["positions"]
            written += 1
            bar.update(min(record["positions"], cfg.positions - bar.n))
            bar.set_postfix(shard=index)
        index += 1
    bar.close()
    if total < cfg.positions:
        return {}
    sequences = load_corpus(out, require_manifest=False)
    seconds = sum(r["seconds"] for r in done.values())
    manifest = {
        "builder": "harvest",
        "config": attrs.asdict(cfg),
        "engine": engine_info or {"name": engine.name},
        "sha256": corpus_hash(sequences),
        "sequences": len(sequences),
        "target_positions": total,
        "by_source": {src: sum(r["by_source"][src] for r in done.values()) for src in ("greedy", "sampled", "python")},
        "prompts": {"answered": sum(len(r["prompts"]) for r in done.values()),
                    "second_turns": sum(r["second_turns"] for r in done.values())},
        "shards": len(done),
        "build_seconds": round(seconds, 1),
        "positions_per_second": round(total / seconds, 1) if seconds else None,
    }
    (out / CORPUS_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
