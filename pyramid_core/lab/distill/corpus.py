"""The offline distillation corpus: what the target says, with its next-token distributions.
(One job, from prompts to stored shards, hence its length.)

Two sources, both available on a machine without a model hub:

* **self-generated text** -- the target answers training prompts, disjoint from the held-out
  prompt set in ``pyramid_core/data/prompts.jsonl`` (which is never trained on): prompts built
  here from templates and topic lists (``training_prompts``) and, with ``self_instruct > 0``,
  prompts the target writes itself (``self_instruct_prompts``: its chat template opened with a
  user turn that starts with one of a few openers per task kind, continued by sampling until the
  turn ends). Templates alone are few enough for a student to memorise; the target's own
  prompts are as varied as the target. Each prompt is answered greedily and, with a seeded
  sampler, at temperature ``sample_temperature``. Greedy answers are the text a greedy pipeline
  verifies; sampled ones add variety.
* **Python's own sources** -- windows of the standard library's ``.py`` files (code, comments
  and docstrings), read by the target with teacher forcing.

For every target position the corpus keeps the target's top-``k`` log-probabilities (fp16) and
token ids (int32) -- the full 49152-wide rows would not fit -- and the log of the mass outside
them. Shards are ``torch.save`` files of :class:`Sequence` records; ``corpus.json`` records the
recipe and a SHA-256 over every token id and stored id, in order (the corpus hash).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from pyramid_core.errors import ConfigError
from pyramid_core.lab.distill.engines import HFEngine, Request, left_padded, prefill_rows
from pyramid_core.lab.prompts import encode_prompt

__all__ = [
    "CorpusConfig",
    "TeacherRows",
    "TrainSequence",
    "training_prompts",
    "self_instruct_prompts",
    "python_source_texts",
    "build_corpus",
    "load_corpus",
    "corpus_hash",
]

CORPUS_MANIFEST = "corpus.json"
SELF_INSTRUCT = "self_instruct.json"

# Templates x topics: ~900 training prompts over the six task kinds of the held-out set, written
# differently from it (the builder checks that none coincides with a held-out prompt).
_TOPICS = (
    "volcanoes", "the water cycle", "honey bees", "black holes", "the Roman empire", "photosynthesis",
    "electric cars", "the printing press", "coral reefs", "vaccines", "the stock market", "chess",
    "jazz music", "the moon landing", "recycling", "sleep", "coffee", "the internet", "rainforests",
    "earthquakes", "solar panels", "the human heart", "dinosaurs", "glaciers", "democracy",
    "bread baking", "the Olympic games", "bicycles", "tea ceremonies", "lighthouses", "penguins",
    "the periodic table", "submarines", "origami", "wind turbines", "the Silk Road", "antibiotics",
    "tides", "public libraries", "hot air balloons", "composting", "the immune system", "comets",
    "the pyramids of Giza", "meditation", "3D printing", "whales", "deserts", "the metric system",
    "urban gardening", "robots", "the French revolution", "rainbows", "cheese making", "bridges",
    "migrating birds", "video games", "the Great Wall of China", "mushrooms", "time zones",
)
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "chat": (
        "Can you tell me something interesting about {t}?",
        "My friend keeps talking about {t}. What should I know so I can join the conversation?",
        "I'm bored this weekend. Suggest a fun activity related to {t}.",
        "Write a short, friendly message inviting a colleague to a talk about {t}.",
    ),
    "translation": (
        "Translate into French: \"I would like to learn more about {t}.\"",
        "Translate into Spanish: \"Yesterday we watched a documentary about {t}.\"",
        "Translate into German: \"{T} is a fascinating subject for children.\"",
    ),
    "summarisation": (
        "Summarise in two sentences why {t} matter to everyday life.",
        "Write a one-paragraph summary of the history of {t}.",
        "Give a three-bullet summary of the main facts about {t}.",
    ),
    "qa": (
        "What is the most common misconception about {t}?",
        "Explain {t} to a ten-year-old.",
        "What are three important facts about {t}?",
        "How did people first learn about {t}?",
    ),
    "maths": (
        "A club about {t} has {a} members and each brings {b} friends. How many people come in total? Show your steps.",
        "A book on {t} costs {a} dollars. With a {b} percent discount, what is the price? Explain.",
        "If a lecture on {t} lasts {a} minutes and there are {b} lectures, how many hours is that?",
    ),
    "retrieval": (
        "Context: {T} were discussed at a meeting on day {a}; {b} people attended. "
        "Question: On which day was the meeting, and how many attended?",
        "Notes: Room {a} hosts the {t} exhibit; the guide speaks for {b} minutes. "
        "Using the notes, where is the exhibit and how long is the talk?",
    ),
}


def training_prompts(seed: int = 0, held_out: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(kind, prompt) pairs for distillation, shuffled with ``seed``; none equals a held-out
    prompt (``ConfigError`` if one would)."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    for kind, templates in _TEMPLATES.items():
        for template, topic in itertools.product(templates, _TOPICS):
            text = template.format(t=topic, T=topic[:1].upper() + topic[1:], a=rng.randint(3, 60), b=rng.randint(2, 25))
            out.append((kind, text))
    rng.shuffle(out)
    clash = set(held_out) & {p for _, p in out}
    if clash:
        raise ConfigError(f"training prompts overlap the held-out prompt set: {sorted(clash)[:3]}")
    return out


# How the target's own user turns may start, per task kind: enough to cover the six kinds; the
# target writes the rest of each prompt (``self_instruct_prompts``).
_OPENERS: dict[str, tuple[str, ...]] = {
    "chat": ("Hi! I", "Can you help me", "I'm trying to decide", "What should I do if", "I feel", "Any tips for",
             "Could you suggest", "My"),
    "translation": ("Translate into French:", "Translate this sentence into Spanish:", "How do you say",
                    "Translate the following from English to German:", "Please translate into Italian:",
                    "Translate into Portuguese:"),
    "summarisation": ("Summarize the following text:", "Give a short summary of", "Summarise the main points of",
                      "Write a one-sentence summary of this passage:", "TL;DR:"),
    "qa": ("What is", "Why do", "How does", "Who", "When did", "Explain why", "What are the differences between",
           "Is it true that"),
    "maths": ("Solve:", "What is", "A store sells", "If a car travels", "Calculate", "Tom has", "Find the value of x:",
              "A rectangle has"),
    "retrieval": ("Read the passage and answer the question.\nPassage:", "Context:",
                  "Use the following notes to answer.\nNotes:", "Based on the text below, answer the question.\nText:"),
}


def _user_turn(tokenizer: Any) -> tuple[list[int], set[int]]:
    """(token ids of the chat template up to a user turn's text, token ids that end the turn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("self-instruct prompts need a tokenizer with a chat template")
    marker = "\u2063PYRAMID\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    prefix, _, suffix = str(text).partition(marker)
    ends = {int(t) for t in tokenizer(suffix, add_special_tokens=False)["input_ids"][:1]}
    if tokenizer.eos_token_id is not None:
        ends.add(int(tokenizer.eos_token_id))
    return list(tokenizer(prefix, add_special_tokens=False)["input_ids"]), ends


@torch.inference_mode()
def self_instruct_prompts(model: Any, tokenizer: Any, n: int, *, seed: int = 0, held_out: Sequence[str] = (),
                          max_tokens: int = 48, temperature: float = 1.0, batch_size: int = 64,
                          progress: bool = True) -> list[tuple[str, str]]:
    """``n`` (kind, prompt) pairs written by ``model`` itself: a user turn of its chat template is
    opened with an opener of the kind (kinds in turn, openers drawn with ``seed``) and sampled at
    ``temperature`` until the turn ends. Turns that do not end within ``max_tokens``, add fewer
    than three words to the opener, repeat an earlier prompt or equal a held-out prompt are dropped; sampling
    stops after ``4 n`` tries (fewer than ``n`` pairs are then returned)."""
    from tqdm.auto import tqdm

    if n <= 0:
        return []
    prefix, ends = _user_turn(tokenizer)
    rng = random.Random(seed)
    kinds = list(_OPENERS)
    seen = set(held_out)
    out: list[tuple[str, str]] = []
    tries = 0
    bar = tqdm(total=n, desc="self-instruct prompts", unit="prompt", disable=not progress)
    while len(out) < n and tries < 4 * n:
        batch = []
        for _ in range(batch_size):
            kind = kinds[tries % len(kinds)]
            opener = rng.choice(_OPENERS[kind])
            batch.append((kind, list(tokenizer(opener, add_special_tokens=False)["input_ids"])))
            tries += 1
        ids, mask = left_padded([prefix + o for _, o in batch], 0, model.device)
        torch.manual_seed(seed * 1_000_003 + tries)
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                             top_k=None, top_p=None, max_new_tokens=max_tokens, eos_token_id=sorted(ends),
                             pad_token_id=0)[:, ids.shape[1]:].cpu()
        for (kind, opener_ids), row in zip(batch, gen.tolist(), strict=True):
            stop = next((j for j, t in enumerate(row) if t in ends), None)
            if stop is None:
                continue
            text = tokenizer.decode(opener_ids + row[:stop], skip_special_tokens=True).strip()
            if len(tokenizer.decode(row[:stop], skip_special_tokens=True).split()) < 3 or text in seen:
                continue
            seen.add(text)
            out.append((kind, text))
            bar.update(1)
            if len(out) == n:
                break
    bar.close()
    return out


def python_source_texts(limit_chars: int, seed: int = 0) -> list[str]:
    """Text from Python's standard library sources on this machine (deterministic order and
    choice), about ``limit_chars`` characters in all."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 2000)
    if not files:
        raise ConfigError(f"no Python sources found in {stdlib}")
    random.Random(seed).shuffle(files)
    texts: list[str] = []
    total = 0
    for path in files:
        if total >= limit_chars:
            break
        text = path.read_text(encoding="utf-8", errors="replace")[: min(6000, limit_chars - total)]
        texts.append(text)
        total += len(text)
    return texts


@attrs.frozen(eq=False)
class TeacherRows:
    """The target's top-k next-token distribution at ``n`` consecutive positions.

    logp:  Float16[Tensor, "n k"]  log-probabilities of the k most likely tokens, descending
    ids:   Int32[Tensor, "n k"]    their token ids (ids[:, 0] is the target's argmax)
    """

    logp: Tensor
    ids: Tensor


@attrs.frozen(eq=False)
class TrainSequence:
    """One training sequence: ``tokens`` (context then text), and the target's rows for the
    positions ``start .. start + n - 1`` (row i predicts ``tokens[start + i + 1]``)."""

    source: str  # "greedy" | "sampled" | "python"
    tokens: list[int]
    start: int
    rows: TeacherRows

    @property
    def n_targets(self) -> int:
        return int(self.rows.ids.shape[0])


@attrs.frozen
class CorpusConfig:
    prompts: int = 600  # templated training prompts answered by the target (greedy and sampled each)
    new_tokens: int = 128  # per answer
    sample_temperature: float = 0.8
    python_chars: int = 200_000  # characters of Python sources
    window: int = 256  # tokens per Python-source window
    top_k: int = 32
    batch_size: int = 24
    seed: int = 0
    chat: bool = True
    self_instruct: int = 0  # prompts the target writes itself, answered like the templated ones
    self_instruct_tokens: int = 48  # longest self-written prompt, in tokens
    self_instruct_temperature: float = 1.0


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def _answer(model: Any, prompts: list[list[int]], cfg: CorpusConfig, eos: set[int],
            sample: bool, generator_seed: int) -> list[TrainSequence]:
    """The target's answers to a batch of encoded prompts (left-padded, one ``generate``)."""
    engine = HFEngine(model, batch_size=len(prompts))
    temperature = cfg.sample_temperature if sample else 0.0
    requests = [Request(tuple(p), cfg.new_tokens, temperature, generator_seed, tuple(sorted(eos))) for p in prompts]
    # row j (logits of step j) predicts generated token j, i.e. sits at position len(p)-1+j
    return [TrainSequence("sampled" if sample else "greedy", p + c.tokens, len(p) - 1,
                          TeacherRows(c.logp, c.ids))  # type: ignore[arg-type]
            for p, c in zip(prompts, engine.complete(requests, top_k=cfg.top_k), strict=True)]


def _read_windows(model: Any, windows: list[list[int]], cfg: CorpusConfig) -> list[TrainSequence]:
    rows = prefill_rows(model, [(w, 0, len(w) - 1) for w in windows], cfg.top_k)
    return [TrainSequence("python", w, 0, TeacherRows(*r)) for w, r in zip(windows, rows, strict=True)]


def corpus_hash(sequences: Sequence[TrainSequence]) -> str:
    h = hashlib.sha256()
    for s in sequences:
        h.update(s.source.encode())
        h.update(torch.tensor(s.tokens, dtype=torch.int64).numpy().tobytes())
        h.update(s.rows.ids.numpy().tobytes())
    return h.hexdigest()


def build_corpus(model: Any, tokenizer: Any, out_dir: str | Path, cfg: CorpusConfig, *,
                 held_out: Sequence[str] = (), progress: bool = True) -> dict[str, Any]:
    """Build (or finish building: finished shards are kept) the corpus in ``out_dir``; return
    the manifest. ``model`` is the target (``AutoModelForCausalLM``)."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / CORPUS_MANIFEST
    if manifest_path.is_file():
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        # fields added to the recipe later keep their defaults in older manifests
        if {**attrs.asdict(CorpusConfig()), **manifest.get("config", {})} == attrs.asdict(cfg):
            return manifest
        raise ConfigError(f"{out} holds a corpus built with another recipe ({manifest.get('config')}); "
                          "use another --corpus folder")
    eos = {int(t) for t in ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])}
    prompts = training_prompts(cfg.seed, held_out)[: cfg.prompts]
    templated = len(prompts)
    if cfg.self_instruct:
        written = out / SELF_INSTRUCT
        if not written.is_file():  # resumable: the target's prompts are written once
            own = self_instruct_prompts(model, tokenizer, cfg.self_instruct, seed=cfg.seed, held_out=held_out,
                                        max_tokens=cfg.self_instruct_tokens, temperature=cfg.self_instruct_temperature,
                                        batch_size=cfg.batch_size, progress=progress)
            written.write_text(json.dumps([{"kind": k, "prompt": p} for k, p in own], indent=1) + "\n")
        prompts += [(d["kind"], d["prompt"]) for d in json.loads(written.read_text())]
    encoded = sorted((encode_prompt(tokenizer, p, cfg.chat) for _, p in prompts), key=len)
    jobs: list[tuple[str, list[list[int]]]] = []
    for mode in ("greedy", "sampled"):
        jobs += [(mode, list(b)) for b in _batches(encoded, cfg.batch_size)]
    texts = python_source_texts(cfg.python_chars, cfg.seed)
    windows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        windows += [ids[i: i + cfg.window] for i in range(0, len(ids) - 32, cfg.window)]
    jobs += [("python", list(b)) for b in _batches(windows, max(1, cfg.batch_size // 3))]

    t0 = time.perf_counter()
    bar = tqdm(total=len(jobs), desc="corpus", unit="batch", disable=not progress)
    for index, (mode, batch) in enumerate(jobs):
        shard = out / f"shard-{index:05d}.pt"
        if not shard.is_file():  # resumable: finished shards are kept
            if mode == "python":
                seqs = _read_windows(model, batch, cfg)
            else:
                seqs = _answer(model, batch, cfg, eos, mode == "sampled", cfg.seed * 100_003 + index)
            tmp = shard.with_suffix(".tmp")
            torch.save([attrs.asdict(s, recurse=False) | {"rows": attrs.asdict(s.rows)} for s in seqs], tmp)
            tmp.replace(shard)
        bar.update(1)
    bar.close()
    sequences = load_corpus(out, require_manifest=False)
    manifest = {
        "config": attrs.asdict(cfg),
        "sha256": corpus_hash(sequences),
        "sequences": len(sequences),
        "target_positions": sum(s.n_targets for s in sequences),
        "by_source": {src: sum(s.n_targets for s in sequences if s.source == src)
                      for src in ("greedy", "sampled", "python")},
        "prompts": {"templated": templated, "self_instruct": len(prompts) - templated},
        "shards": len(jobs),
        "build_seconds_this_run": round(time.perf_counter() - t0, 1),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_corpus(out_dir: str | Path, *, require_manifest: bool = True) -> list[TrainSequence]:
    out = Path(out_dir)
    if require_manifest and not (out / CORPUS_MANIFEST).is_file():
        raise ConfigError(f"{out} holds no finished corpus ({CORPUS_MANIFEST} missing); run `pyramid distill corpus`")
    sequences: list[TrainSequence] = []
    for shard in sorted(out.glob("shard-*.pt")):
        for d in torch.load(shard, weights_only=True):
            rows = TeacherRows(d["rows"]["logp"], d["rows"]["ids"])
            sequences.append(TrainSequence(d["source"], list(d["tokens"]), int(d["start"]), rows))
    return sequences
