"""Knowledge distillation of student stages on the offline corpus, and their evaluation.

Training minimises, at every corpus position, the cross-entropy from the target's stored top-k
next-token distribution (renormalised) to the student's -- the forward KL up to a constant.
A sub-vocabulary student is scored on the sub-vocabulary only (teacher mass outside it is
dropped: the student can never propose those tokens). Decoder layers run under bfloat16
autocast; the head, the softmax and the loss in float32.

Runs are seeded and resumable: the batch order of every epoch is a function of (seed, epoch),
and ``checkpoint.pt`` (trainable weights, optimiser, step) is rewritten every ``save_every``
steps and when the time budget runs out; the same command continues where it stopped.

``evaluate_stages`` measures what a pipeline cares about on held-out prompts: along the
target's own greedy continuation, how often each stage's argmax equals the target's (and the
next stage's), which is the per-token acceptance of greedy speculative decoding; and each
stage's forward time when decoding one token with its KV cache (the cost ratios c).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from pyramid_core.errors import ConfigError
from pyramid_core.hf.corpus import TrainSequence
from pyramid_core.hf.student import SubVocabHead, build_student, save_student, trainable_state
from pyramid_core.plan import measure_stage_time

__all__ = ["TrainConfig", "choose_sub_vocab", "train_student", "evaluate_stages", "corpus_agreement", "StageReport"]

CHECKPOINT = "checkpoint.pt"


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
                   pool: Sequence[int] | None = None) -> list[list[int]]:
    """Batches of sequence indices (from ``pool``, default all, repeats allowed) in a seeded
    random order, each at most ``batch_tokens`` padded tokens (or one longer sequence)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    items = list(pool) if pool is not None else list(range(len(lengths)))
    order = [items[i] for i in torch.randperm(len(items), generator=g).tolist()]
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
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


def _lr(step: int, cfg: TrainConfig) -> float:
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
    step, history, seconds = 0, [], 0.0
    ckpt = out / CHECKPOINT
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False, map_location=device)
        defaults = attrs.asdict(TrainConfig(layers=cfg.layers))  # fields added later keep their defaults
        if {**defaults, **state["config"], "layers": tuple(state["config"]["layers"])} != attrs.asdict(cfg):
            raise ConfigError(f"{ckpt} was written by another training configuration ({state['config']}); "
                              "use another --out folder or delete the checkpoint")
        student.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step, history, seconds = int(state["step"]), list(state["history"]), float(state["seconds"])

    def save() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"config": attrs.asdict(cfg), "step": step, "history": history, "seconds": seconds,
                    "trainable": {k: v.detach().clone() for k, v in trainable_state(student).items()},
                    "optimizer": optimizer.state_dict()}, tmp)
        tmp.replace(ckpt)

    schedule = _Schedule(sequences, cfg)
    student.train()
    t_start = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"distil layers={list(cfg.layers)}", unit="step", disable=not progress)
    while step < cfg.steps:
        if max_minutes is not None and (time.perf_counter() - t_start) / 60 >= max_minutes:
            break
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, cfg)
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


@attrs.define
class StageReport:
    name: str
    agreement_with_target: float
    agreement_with_next: float | None  # with the stage above it (None for the top stage)
    by_kind: dict[str, float]
    ms_per_forward: float
    cost_vs_next: float | None
    cost_vs_target: float


@torch.inference_mode()
def _argmax_along(stage: Any, prompt: list[int], continuation: list[int]) -> list[int]:
    """The stage's argmax after ``prompt + continuation[:i]`` for every i (one forward, no cache)."""
    ids = torch.tensor([prompt + continuation[:-1]], device=stage.device)
    logits = stage.model(input_ids=ids).logits[0, len(prompt) - 1:, : stage.vocab_size]
    return [int(i) for i in logits.argmax(-1).tolist()]


def evaluate_stages(stages: Sequence[Any], prompts: Sequence[tuple[str, list[int]]], new_tokens: int, *,
                    timing_repeats: int = 30, progress: bool = True) -> list[StageReport]:
    """``stages`` smallest first, the target last (``HFStage``s); ``prompts`` (kind, token ids)
    held out from training. Agreement = fraction of positions of the target's greedy
    continuation where a stage's argmax equals the target's token (resp. the next stage's
    argmax)."""
    from tqdm.auto import tqdm

    if len(stages) < 2:
        raise ConfigError("evaluate_stages needs at least one stage and the target")
    target = stages[-1]
    hits_t = [0] * len(stages)
    hits_n = [0] * len(stages)
    kind_hits: list[dict[str, list[int]]] = [{} for _ in stages]
    total = 0
    for kind, prompt in tqdm(prompts, desc="held-out agreement", disable=not progress):
        cont = _greedy(target, prompt, new_tokens)
        if not cont:
            continue
        argmaxes = [_argmax_along(s, prompt, cont) for s in stages]
        total += len(cont)
        for i, am in enumerate(argmaxes):
            same_t = sum(a == b for a, b in zip(am, cont))
            hits_t[i] += same_t
            k = kind_hits[i].setdefault(kind, [0, 0])
            k[0] += same_t
            k[1] += len(cont)
            if i + 1 < len(stages):
                hits_n[i] += sum(a == b for a, b in zip(am, argmaxes[i + 1]))
    if total == 0:
        raise ConfigError("the target produced no tokens on the evaluation prompts")
    context_len = len(prompts[0][1]) + min(32, new_tokens)
    ms = [1000 * measure_stage_time(s, context_len, timing_repeats, warmup=3) for s in stages]
    reports = []
    for i, s in enumerate(stages):
        top = i + 1 == len(stages)
        reports.append(StageReport(
            name=str(getattr(s, "name", f"stage {i + 1}")),
            agreement_with_target=hits_t[i] / total,
            agreement_with_next=None if top else hits_n[i] / total,
            by_kind={k: v[0] / v[1] for k, v in kind_hits[i].items()},
            ms_per_forward=ms[i],
            cost_vs_next=None if top else ms[i] / ms[i + 1],
            cost_vs_target=ms[i] / ms[-1],
        ))
    return reports


@torch.inference_mode()
def _greedy(target: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """The target's greedy continuation (stops after an end-of-sequence token)."""
    model = target.model
    ids = torch.tensor([prompt], device=target.device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                         temperature=None, top_k=None, top_p=None, pad_token_id=0)
    cont = [int(t) for t in out[0, len(prompt):].tolist()]
    eos = getattr(getattr(target, "tokenizer", None), "eos_token_id", None)
    if eos is not None and eos in cont:
        cont = cont[: cont.index(eos) + 1]
    return cont


@torch.inference_mode()
def corpus_agreement(stage: Any, sequences: Sequence[TrainSequence], sample: int, seed: int = 0) -> dict[str, float]:
    """Top-1 agreement of ``stage`` with the target's stored argmax on ``sample`` corpus
    sequences drawn with ``seed``, per source ("greedy", "sampled", "python"). Next to the
    held-out agreement it shows how much a student memorised instead of generalising."""
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(sequences), generator=g)[:sample].tolist()
    hits: dict[str, list[int]] = {}
    for i in picked:
        s = sequences[i]
        ids = torch.tensor([s.tokens], device=stage.device)
        logits = stage.model(input_ids=ids).logits[0, s.start: s.start + s.n_targets, : stage.vocab_size]
        same = int((logits.argmax(-1).cpu() == s.rows.ids[:, 0].long()).sum())
        h = hits.setdefault(s.source, [0, 0])
        h[0] += same
        h[1] += s.n_targets
    return {src: h[0] / h[1] for src, h in sorted(hits.items())}


def write_report(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
