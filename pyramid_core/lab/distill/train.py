"""Knowledge distillation of student stages on the offline corpus.

Training minimises, at every corpus position, the cross-entropy from the target's stored top-k
next-token distribution (renormalised) to the student's -- the forward KL up to a constant.
A sub-vocabulary student is scored on the sub-vocabulary only (teacher mass outside it is
dropped: the student can never propose those tokens). Decoder layers run under bfloat16
autocast; the head, the softmax and the loss in float32.

Runs are seeded and resumable: the batch order of every epoch is a function of (seed, epoch),
and ``checkpoint.pt`` (trainable weights, optimiser, step) is rewritten every ``save_every``
steps and when the time budget runs out; the same command continues where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
import torch
from torch import Tensor

from pyramid_core.backends.hf.student import (
    SubVocabHead,
    build_student,
    save_student,
    trainable_state,
)
from pyramid_core.errors import ConfigError
from pyramid_core.lab.distill.corpus import TrainSequence
from pyramid_core.lab.outputs import json_text

__all__ = ["TrainConfig", "choose_sub_vocab", "pack_batches", "train_student", "write_report"]

CHECKPOINT = "checkpoint.pt"


def resume(ckpt: Path, cfg: Any, defaults: Any, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
           device: torch.device) -> tuple[int, list[dict[str, Any]], float]:
    """Load checkpoint ``ckpt`` into ``module`` and ``optimizer``: (step, history, seconds).
    A checkpoint of another configuration (``attrs`` config ``cfg``; fields it lacks are taken
    from ``defaults``) is a ``ConfigError``."""
    state = torch.load(ckpt, weights_only=False, map_location=device)
    saved = {**attrs.asdict(defaults), **state["config"], "layers": tuple(state["config"]["layers"])}
    if saved != attrs.asdict(cfg):
        raise ConfigError(f"{ckpt} was written by another training configuration ({state['config']}); "
                          "use another --out folder or delete the checkpoint")
    module.load_state_dict(state["trainable"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), list(state["history"]), float(state["seconds"])


def save_checkpoint(ckpt: Path, cfg: Any, step: int, history: list[dict[str, Any]], seconds: float,
                    trainable: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Write the resumable state atomically (a temporary file, then a rename)."""
    tmp = ckpt.with_suffix(".tmp")
    torch.save({"config": attrs.asdict(cfg), "step": step, "history": history, "seconds": seconds,
                "trainable": {k: v.detach().clone() for k, v in trainable.items()},
                "optimizer": optimizer.state_dict()}, tmp)
    tmp.replace(ckpt)


@attrs.frozen
class TrainConfig:
    layers: tuple[int, ...]
    sub_vocab: int = 0  # 0 = the target's full (tied) head
    steps: int = 300
    batch_tokens: int = 4096
    lr: float = 5e-4
    warmup: int = 20
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 20
    greedy_repeats: int = 1  # each epoch holds the target's greedy answers this many times


def choose_sub_vocab(sequences: Sequence[TrainSequence], size: int, always: Sequence[int] = ()) -> Tensor:
    """The ``size`` most frequent token ids among the corpus texts and the target's top-1
    predictions (ties by id), plus ``always`` (e.g. end-of-sequence), sorted."""
    counts: Counter[int] = Counter()
    for s in sequences:
        counts.update(s.tokens[s.start + 1:])
        counts.update(s.rows.ids[:, 0].tolist())
    keep = list(dict.fromkeys(int(t) for t in always))  # unique, in order
    for token, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(keep) >= size:
            break
        if token not in keep:
            keep.append(token)
    return torch.tensor(sorted(keep[:size]), dtype=torch.long)


def _epoch_batches(lengths: Sequence[int], batch_tokens: int, seed: int, epoch: int,
                   pool: Sequence[int] | None = None, sort_window: int = 0) -> list[list[int]]:
    """Batches of sequence indices (from ``pool``, default all, repeats allowed) in a seeded
    random order, each at most ``batch_tokens`` padded tokens (or one longer sequence).

    ``sort_window`` = w > 0: the shuffled order is cut into windows of w sequences, each sorted by
    length before it is cut into batches, and the batches of the epoch are shuffled again. A
    batch then holds sequences of similar lengths (less padding: more real tokens per step) while
    every sequence still lands in a random batch of a random step; w = 0 batches the shuffled
    order as it is."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    items = list(pool) if pool is not None else list(range(len(lengths)))
    order = [items[i] for i in torch.randperm(len(items), generator=g).tolist()]
    if sort_window <= 0:
        return pack_batches(order, lengths, batch_tokens)
    batches: list[list[int]] = []
    for start in range(0, len(order), sort_window):  # stable sort: ties keep the shuffled order
        batches += pack_batches(sorted(order[start:start + sort_window], key=lambda i: lengths[i]), lengths,
                                batch_tokens)
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def pack_batches(indices: Sequence[int], lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """``indices`` cut in their order into batches of at most ``batch_tokens`` padded tokens (the
    longest length times the batch size; a longer sequence is a batch of its own)."""
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in indices:
        width_new = max(width, lengths[i])
        if current and width_new * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, width_new = [], lengths[i]
        current.append(i)
        width = width_new
    if current:
        batches.append(current)
    return batches


class _Schedule:
    """Step -> list of sequence indices, deterministic in (seed, epoch)."""

    def __init__(self, sequences: Sequence[TrainSequence], cfg: TrainConfig) -> None:
        self.lengths = [len(s.tokens) for s in sequences]
        self.pool = [i for i, s in enumerate(sequences)
                     for _ in range(cfg.greedy_repeats if s.source == "greedy" else 1)]
        self.cfg = cfg
        self._epochs: dict[int, list[list[int]]] = {}

    def batch(self, step: int) -> list[int]:
        epoch, offset = 0, step
        while True:
            if epoch not in self._epochs:
                self._epochs[epoch] = _epoch_batches(self.lengths, self.cfg.batch_tokens, self.cfg.seed, epoch, self.pool)
            n = len(self._epochs[epoch])
            if offset < n:
                return self._epochs[epoch][offset]
            offset -= n
            epoch += 1


class LRSchedule(Protocol):
    """The fields ``lr_at`` reads (``TrainConfig`` and ``FeatureTrainConfig`` have them)."""

    @property
    def lr(self) -> float: ...
    @property
    def warmup(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def min_lr_fraction(self) -> float: ...


def lr_at(step: int, cfg: LRSchedule) -> float:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to ``min_lr_fraction`` of ``cfg.lr``
    at ``cfg.steps`` (any config with those fields: the student's and the feature head's)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_fraction + (1 - cfg.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _collate(batch: list[TrainSequence], to_sub: Tensor | None, device: torch.device) -> dict[str, Tensor]:
    """Right-padded token ids and, per supervised position, the teacher's top-k (as sub-vocab
    columns when ``to_sub`` maps token id -> column, -1 off the sub-vocabulary)."""
    width = max(len(s.tokens) for s in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows_b, rows_t, logp, cols = [], [], [], []
    for b, s in enumerate(batch):
        ids[b, : len(s.tokens)] = torch.tensor(s.tokens)
        mask[b, : len(s.tokens)] = 1
        n = s.n_targets
        rows_b.append(torch.full((n,), b, dtype=torch.long))
        rows_t.append(torch.arange(s.start, s.start + n))
        logp.append(s.rows.logp.float())
        cols.append(s.rows.ids.long())
    col = torch.cat(cols)
    if to_sub is not None:
        col = to_sub[col]
    teacher_lp = torch.cat(logp)
    p = torch.softmax(teacher_lp, dim=-1)
    p = torch.where(col >= 0, p, torch.zeros_like(p))
    data = {"ids": ids, "mask": mask, "b": torch.cat(rows_b), "t": torch.cat(rows_t), "p": p,
            "col": col.clamp(min=0), "top1": col[:, 0]}
    return {k: v.to(device, non_blocking=True) for k, v in data.items()}


@contextlib.contextmanager
def _tf32() -> Iterator[None]:
    """TF32 tensor cores for the float32 head and loss on CUDA (no effect on CPU)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _loss(student: Any, data: dict[str, Tensor]) -> tuple[Tensor, float, int]:
    device_type = data["ids"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type in ("cpu", "cuda")):
        hidden = student.model(input_ids=data["ids"], attention_mask=data["mask"]).last_hidden_state
    h = hidden[data["b"], data["t"]].float()  # [n, hidden]: supervised positions only
    head = student.lm_head
    weight = head.weight
    logits = h @ weight.float().T  # [n, K or V]
    logq = torch.log_softmax(logits, dim=-1)
    picked = logq.gather(1, data["col"])
    loss = -(data["p"] * picked).sum(-1).mean()
    with torch.no_grad():
        agree = logits.argmax(-1) == data["top1"]
    return loss, float(agree.float().mean()), int(agree.numel())


def train_student(target: Any, sequences: Sequence[TrainSequence], cfg: TrainConfig, out_dir: str | Path, *,
                  base: str, metadata: dict[str, Any] | None = None, eos: Sequence[int] = (),
                  max_minutes: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a student of ``target`` on ``sequences`` and write it to ``out_dir`` (fp16
    safetensors + stage.json). Returns the training report; ``report["finished"]`` is False
    when ``max_minutes`` ran out first (run again to resume)."""
    from tqdm.auto import tqdm

    if not sequences:
        raise ConfigError("the distillation corpus is empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    sub = choose_sub_vocab(sequences, cfg.sub_vocab, eos) if cfg.sub_vocab else None
    device = target.get_input_embeddings().weight.device
    student = build_student(target, cfg.layers, sub).to(device)
    to_sub: Tensor | None = None
    if sub is not None:
        to_sub = torch.full((int(target.get_input_embeddings().weight.shape[0]),), -1, dtype=torch.long)
        to_sub[sub] = torch.arange(sub.numel())
    params = [p for p in student.parameters() if p.requires_grad]
    if isinstance(student.lm_head, SubVocabHead) is False:
        params = [p for p in params if p is not student.lm_head.weight]  # tied to the frozen embedding
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    history: list[dict[str, Any]] = []
    step, seconds = 0, 0.0
    ckpt = out / CHECKPOINT
    if ckpt.is_file():  # fields added to the config later keep their defaults
        step, history, seconds = resume(ckpt, cfg, TrainConfig(layers=cfg.layers), student, optimizer, device)

    def save() -> None:
        save_checkpoint(ckpt, cfg, step, history, seconds, trainable_state(student), optimizer)

    schedule = _Schedule(sequences, cfg)
    student.train()
    t_start = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"distil layers={list(cfg.layers)}", unit="step", disable=not progress)
    while step < cfg.steps:
        if max_minutes is not None and (time.perf_counter() - t_start) / 60 >= max_minutes:
            break
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        data = _collate([sequences[i] for i in schedule.batch(step)], to_sub, device)
        with _tf32():
            loss, agree, n = _loss(student, data)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        seconds += time.perf_counter() - t0
        value = loss.item()
        history.append({"step": step, "loss": round(value, 4), "top1": round(agree, 4), "positions": n})
        bar.set_postfix(loss=f"{value:.3f}", top1=f"{agree:.3f}")
        bar.update(1)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save()
    bar.close()
    save()
    finished = step >= cfg.steps
    recent = history[-20:]
    report = {
        "finished": finished,
        "steps": step,
        "train_seconds": round(seconds, 1),
        "train_positions_seen": int(sum(h["positions"] for h in history)),
        "final_train_loss": round(statistics.fmean(h["loss"] for h in recent), 4) if recent else None,
        "final_train_top1": round(statistics.fmean(h["top1"] for h in recent), 4) if recent else None,
        "config": attrs.asdict(cfg),
    }
    if finished:
        student.eval()
        save_student(student, out, base=base, metadata={"training": report} | (metadata or {}))
    return report


def write_report(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).write_text(json_text(payload, indent=2) + "\n")
