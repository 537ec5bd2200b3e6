"""Training feature-level drafts (``hf.feature_head``) on the offline corpus: ``pyramid distill
feature``.

The corpus (``distill.corpus``) holds the target's answers and its top-k next-token distributions.
Training needs, in addition, the target's features of every position: they are computed once with
the target (no grad, bfloat16 autocast by default: faster on a CPU, see [the feature
draft](../../distill.md#the-feature-draft)) for a bounded subset of the sequences -- a seeded choice
up to ``max_positions`` -- and cached in fp16 next to the checkpoints (``features/``; resumable,
tied to the corpus hash).

Loss per slot j (it reads the target's feature of position j-1 and token j):
- ``eagle1``: ``reg_weight`` x smooth-L1(h^_j, f_j) + ``ce_weight`` x the cross-entropy from the
  target's stored top-k distribution at position j (renormalised; on a sub-vocabulary head
  restricted to it) to the head's;
- ``eagle3``: the cross-entropy only (h^ lives in the fused space).
With ``unroll`` = k > 1 the head is also trained on its own predictions (EAGLE-3's
"training-time test"): pass i reads, at slot j, its own h^ of slot j-1 from pass i-1 and attends
as the draft does after i-1 drafted positions (``hf.feature_head.unrolled_mask``); pass i's
losses are weighted by ``unroll_decay`` ** (i-1).

Runs are seeded and resumable (``checkpoint.pt`` every ``save_every`` steps and when the time
budget ends). ``feature_argmax_along`` is the evaluation path of ``pyramid distill eval``: the
source's features along the target's greedy continuation (teacher forcing), the head's argmax per
position and per draft depth.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from pyramid_core.backends.hf.head import (
    FeatureHead,
    FeatureHeadConfig,
    is_feature_dir,
    load_feature_head,
    save_feature_head,
    unrolled_mask,
)
from pyramid_core.backends.hf.layers import decoder_layers
from pyramid_core.backends.hf.student import STAGE_FILE
from pyramid_core.errors import ConfigError
from pyramid_core.lab.distill.corpus import TrainSequence, corpus_hash
from pyramid_core.lab.distill.train import (
    _epoch_batches,
    choose_sub_vocab,
    lr_at,
    pack_batches,
    resume,
    save_checkpoint,
)

__all__ = ["FeatureTrainConfig", "extract_features", "train_feature_head", "feature_argmax_along",
           "source_features", "init_from_target", "init_from_head", "INITS"]

CHECKPOINT = "checkpoint.pt"
FEATURES = "features"
INITS = ("random", "target")
"""How a new head's weights start: ``random`` (normal, the config's initializer range) or
``target`` (``init_from_target``); ``FeatureTrainConfig.init`` may also name the folder of a
trained head (``init_from_head``: a warm start with a fresh optimiser and schedule)."""


def _init_ok(instance: Any, attribute: Any, value: str) -> None:
    if value not in INITS and not is_feature_dir(value):
        raise ConfigError(f"init must be one of {', '.join(INITS)} or the folder of a trained feature head "
                          f"(its stage.json and model.safetensors), got {value!r}")


@attrs.frozen
class FeatureTrainConfig:
    layers: tuple[int, ...] = (-1,)
    variant: str = "eagle1"
    depth: int = 1
    sub_vocab: int = 8192
    steps: int = 2000
    batch_tokens: int = 4096
    lr: float = 1e-3
    warmup: int = 30
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    reg_weight: float = 1.0
    ce_weight: float = 0.1
    unroll: int = 2
    unroll_decay: float = 0.8
    max_positions: int = 400_000
    seed: int = 0
    save_every: int = 50
    init: str = attrs.field(default="random", validator=_init_ok)
    sort_window: int = attrs.field(default=0, validator=attrs.validators.ge(0))  # ``train._epoch_batches``; 0 = none

    @property
    def head(self) -> FeatureHeadConfig:
        return FeatureHeadConfig(layers=self.layers, variant=self.variant, depth=self.depth, sub_vocab=self.sub_vocab)


def _hidden_index(layer: int, num_layers: int) -> int:
    return num_layers if layer == -1 else layer + 1


def _sub_ids(head: FeatureHead) -> Tensor | None:
    """The full-vocabulary ids of a head's sub-vocabulary rows (None: it uses the target's head)."""
    if head.own_head is None:
        return None
    ids = head.own_head.token_ids
    assert isinstance(ids, Tensor)
    return ids


def init_from_head(path: str | Path, target: Any, cfg: FeatureHeadConfig) -> FeatureHead:
    """The trained head in ``path``, loaded on ``target`` to train further on another corpus or
    with another schedule. Its architecture must be ``cfg``'s (variant, layers, depth,
    sub-vocabulary size): it keeps its sub-vocabulary rows, since its head's weights are tied to
    them. A mismatch is a ``ConfigError`` that names the field."""
    warm = load_feature_head(path, target)
    theirs, ours = attrs.asdict(warm.cfg), attrs.asdict(cfg)
    for name, value in ours.items():
        if theirs.get(name) != value:
            raise ConfigError(f"init={path}: the head there has {name}={theirs.get(name)!r}, this run asks for "
                              f"{value!r}; pass the same --{name.replace('_', '-')} or start from random or target")
    return warm


@torch.no_grad()
def init_from_target(head: FeatureHead, target: Any) -> None:
    """Start the head's decoder layers from the target's last ``depth`` layers (attention, MLP and
    norms), so training begins from a layer that already maps a late hidden state to the next one.

    Where the head's shapes differ from the target's: EAGLE-3's first layer reads
    ``[norm(embedding) ; norm(u)]`` (2H wide q, k, v), so the u half of q, k, v is the target
    layer's and the embedding half keeps its random start; its ``hidden_norm`` is the target
    layer's input norm. The input map starts as the identity on what comes nearest to the last
    layer's input: EAGLE-3's ``fuse`` passes the deepest fused layer through, EAGLE-1's ``fc``
    the feature half. The sub-vocabulary head is the target's rows already."""
    source = decoder_layers(target)[2]
    if head.cfg.depth > len(source):
        raise ConfigError(f"init=target: the head has {head.cfg.depth} layers, the target only {len(source)}")
    hidden = head.hidden
    for mine, theirs in zip(head.layers, list(source)[-head.cfg.depth:], strict=True):
        own, their = mine.state_dict(), theirs.state_dict()
        for name, value in their.items():
            if name not in own:
                continue
            if own[name].shape == value.shape:
                own[name].copy_(value)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) and \
                    own[name].shape == (value.shape[0], 2 * value.shape[1]):
                own[name][:, hidden:].copy_(value)  # the u half (module docstring of hf.feature_head)
            else:
                raise ConfigError(f"init=target: {name} is {tuple(own[name].shape)} in the head and "
                                  f"{tuple(value.shape)} in the target")
        mine.load_state_dict(own)
    if head.hidden_norm is not None:
        first: Any = source[-head.cfg.depth]
        head.hidden_norm.load_state_dict(first.input_layernorm.state_dict())
    eye = torch.eye(hidden, dtype=head.reference_weight.dtype, device=head.reference_weight.device)
    if head.fuse is not None:  # the deepest source layer passes through
        deepest = max(range(len(head.cfg.layers)), key=lambda i: _hidden_index(head.cfg.layers[i], len(source)))
        head.fuse.weight.zero_()
        head.fuse.weight[:, deepest * hidden:(deepest + 1) * hidden].copy_(eye)
    if head.fc is not None:  # x = u_prev at the start: fc reads [u_prev ; embedding]
        head.fc.weight.zero_()
        head.fc.weight[:, :hidden].copy_(eye)
        if head.fc.bias is not None:
            head.fc.bias.zero_()


@torch.inference_mode()
def source_features(model: Any, ids: Tensor, layers: Sequence[int], *, autocast: bool = False,
                    attention_mask: Tensor | None = None) -> Tensor:
    """``Float[Tensor, "b t len(layers)*H"]``: the features of ``layers`` (``hf.features``
    numbering) of a causal LM at every position of ``ids`` (``Long[Tensor, "b t"]``)."""
    device_type = ids.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast and device_type in ("cpu", "cuda")):
        out = model.model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True)
    n = int(model.config.num_hidden_layers)
    states = out.hidden_states
    return torch.cat([states[_hidden_index(i, n)].float() for i in layers], dim=-1)


def _subset(sequences: Sequence[TrainSequence], max_positions: int, seed: int) -> list[int]:
    """A seeded choice of sequence indices, about ``max_positions`` positions in all."""
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(seed)).tolist()
    out, total = [], 0
    for i in order:
        if total >= max_positions:
            break
        out.append(i)
        total += len(sequences[i].tokens)
    return sorted(out)


def extract_features(model: Any, sequences: Sequence[TrainSequence], layers: Sequence[int], out_dir: str | Path, *,
                     max_positions: int, seed: int = 0, autocast: bool = True, batch_tokens: int = 4096,
                     corpus_sha256: str | None = None, progress: bool = True) -> tuple[list[int], list[Tensor]]:
    """(indices of the chosen sequences, their features ``Float16[Tensor, "len width"]``),
    computed once and cached in ``out_dir`` (resumable by chunks; a cache of another corpus,
    subset or layer choice is an error)."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chosen = _subset(sequences, max_positions, seed)
    recipe = {"layers": list(layers), "max_positions": max_positions, "seed": seed, "autocast": autocast,
              "corpus_sha256": corpus_sha256, "sequences": len(chosen)}
    manifest = out / "features.json"
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        if have.get("recipe") != recipe:
            raise ConfigError(f"{out} caches features of another recipe ({have.get('recipe')}); delete it or use "
                              "another --out folder")
    else:
        manifest.write_text(json.dumps({"recipe": recipe, "indices": chosen}) + "\n")
    lengths = [len(s.tokens) for s in sequences]
    chunks = pack_batches(sorted(chosen, key=lengths.__getitem__), lengths, batch_tokens)  # similar lengths batch well
    device = model.get_input_embeddings().weight.device
    feats: dict[int, Tensor] = {}
    t0 = time.perf_counter()
    for c, chunk in enumerate(tqdm(chunks, desc="target features", unit="batch", disable=not progress)):
        path = out / f"features-{c:05d}.pt"
        if path.is_file():
            feats.update(zip(chunk, torch.load(path, weights_only=True), strict=True))
            continue
        width = max(len(sequences[i].tokens) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, i in enumerate(chunk):
            ids[b, : len(sequences[i].tokens)] = torch.tensor(sequences[i].tokens)
            mask[b, : len(sequences[i].tokens)] = 1
        f = source_features(model, ids.to(device), layers, autocast=autocast, attention_mask=mask.to(device))
        part = [f[b, : len(sequences[i].tokens)].to(torch.float16).cpu().clone() for b, i in enumerate(chunk)]
        tmp = path.with_suffix(".tmp")
        torch.save(part, tmp)
        tmp.replace(path)
        feats.update(zip(chunk, part, strict=True))
    info = json.loads(manifest.read_text())
    info.setdefault("seconds", round(time.perf_counter() - t0, 1))
    info["positions"] = int(sum(v.shape[0] for v in feats.values()))
    manifest.write_text(json.dumps(info) + "\n")
    return chosen, [feats[i] for i in chosen]


def _batch_at(step: int, lengths: Sequence[int], cfg: FeatureTrainConfig, epochs: dict[int, list[list[int]]]) -> list[int]:
    epoch, offset = 0, step
    while True:
        if epoch not in epochs:
            epochs[epoch] = _epoch_batches(lengths, cfg.batch_tokens, cfg.seed, epoch, sort_window=cfg.sort_window)
        if offset < len(epochs[epoch]):
            return epochs[epoch][offset]
        offset -= len(epochs[epoch])
        epoch += 1


def _collate(seqs: list[TrainSequence], feats: list[Tensor], to_sub: Tensor | None, device: torch.device) -> dict[str, Tensor]:
    """Right-padded tokens and features, the valid-slot mask, and per supervised position the
    teacher's renormalised top-k (as sub-vocabulary columns when ``to_sub`` is given)."""
    width = max(len(s.tokens) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    f = torch.zeros(len(seqs), width, feats[0].shape[-1])
    rows_b, rows_t, logp, cols = [], [], [], []
    for b, (s, x) in enumerate(zip(seqs, feats, strict=True)):
        n = len(s.tokens)
        ids[b, :n] = torch.tensor(s.tokens)
        valid[b, :n] = True
        f[b, :n] = x.float()
        k = s.n_targets
        rows_b.append(torch.full((k,), b, dtype=torch.long))
        rows_t.append(torch.arange(s.start, s.start + k))
        logp.append(s.rows.logp.float())
        cols.append(s.rows.ids.long())
    col = torch.cat(cols)
    if to_sub is not None:
        col = to_sub[col]
    p = torch.softmax(torch.cat(logp), dim=-1)
    p = torch.where(col >= 0, p, torch.zeros_like(p))
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-9)
    data = {"ids": ids, "valid": valid, "f": f, "b": torch.cat(rows_b), "t": torch.cat(rows_t), "p": p,
            "col": col.clamp(min=0), "top1": col[:, 0]}
    return {k: v.to(device) for k, v in data.items()}


def _head_logits(head: FeatureHead, h: Tensor) -> Tensor:
    """Logits over the head's own rows (its sub-vocabulary, or the full vocabulary)."""
    if head.norm is not None:
        h = head.norm(h)
    owner = head.own_head if head.own_head is not None else head.base_head
    weight = owner.weight
    assert isinstance(weight, Tensor)
    return h.float() @ weight.float().T


def _passes(head: FeatureHead, data: dict[str, Tensor], unroll: int, autocast: bool) -> list[Tensor]:
    """h^ of every slot in each unrolled pass (``Float[Tensor, "b t H"]`` each)."""
    from transformers import DynamicCache

    ids, f = data["ids"], data["f"]
    b, t = ids.shape
    u = head.fuse_features(f)
    u_prev = torch.cat([torch.zeros_like(u[:, :1]), u[:, :-1]], dim=1)
    positions = torch.arange(t, device=ids.device).unsqueeze(0).expand(b, t)
    device_type = ids.device.type
    cache = DynamicCache(config=head.config) if unroll > 1 else None
    out: list[Tensor] = []
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast and device_type in ("cpu", "cuda")):
        h = head.slots(u_prev, ids, positions, mask=None, cache=cache)
        out.append(h)
        for k in range(2, unroll + 1):
            prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
            mask = unrolled_mask(t, k, ids.device)[None, None]
            h = head.slots(prev.to(u_prev.dtype), ids, positions, mask=mask, cache=cache)
            out.append(h)
    return out


def _loss(head: FeatureHead, data: dict[str, Tensor], cfg: FeatureTrainConfig, autocast: bool) -> tuple[Tensor, dict[str, float]]:
    passes = _passes(head, data, cfg.unroll, autocast)
    total = torch.zeros((), device=data["ids"].device)
    stats: dict[str, float] = {}
    valid = data["valid"]
    for k, h in enumerate(passes, start=1):
        weight = cfg.unroll_decay ** (k - 1)
        ok = data["t"] >= k - 1  # pass k needs k-1 slots before it
        hb = h[data["b"][ok], data["t"][ok]]
        logits = _head_logits(head, hb)
        logq = torch.log_softmax(logits, dim=-1)
        ce = -(data["p"][ok] * logq.gather(1, data["col"][ok])).sum(-1).mean()
        loss = cfg.ce_weight * ce if head.cfg.regresses else ce
        if head.cfg.regresses:
            slot_ok = valid.clone()
            slot_ok[:, : k - 1] = False
            reg = torch.nn.functional.smooth_l1_loss(h.float()[slot_ok], data["f"][slot_ok])
            loss = loss + cfg.reg_weight * reg
            stats[f"reg{k}"] = float(reg.detach())
        total = total + weight * loss
        with torch.no_grad():
            stats[f"top1_{k}"] = float((logits.argmax(-1) == data["top1"][ok]).float().mean())
        stats[f"ce{k}"] = float(ce.detach())
    stats["positions"] = float(int(data["t"].numel()))
    return total, stats


def train_feature_head(target: Any, sequences: Sequence[TrainSequence], cfg: FeatureTrainConfig, out_dir: str | Path, *,
                       base: str, metadata: dict[str, Any] | None = None, eos: Sequence[int] = (),
                       max_minutes: float | None = None, autocast: bool = True, corpus_sha256: str | None = None,
                       features_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a feature head of ``target`` on ``sequences`` and write it to ``out_dir``
    (``hf.feature_head`` format). Returns the training report; ``report["finished"]`` is False
    when ``max_minutes`` ran out first (run again to resume). ``features_dir``: where the target's
    features are cached (default ``out_dir/features``; runs that read the same layers of the
    same corpus subset can share one)."""
    from tqdm.auto import tqdm

    if not sequences:
        raise ConfigError("the distillation corpus is empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = target.get_input_embeddings().weight.device
    t_start = time.perf_counter()
    cache = Path(features_dir) if features_dir is not None else out / FEATURES
    chosen, feats = extract_features(target, sequences, cfg.layers, cache, max_positions=cfg.max_positions,
                                     seed=cfg.seed, autocast=autocast, corpus_sha256=corpus_sha256, progress=progress)
    train = [sequences[i] for i in chosen]
    torch.manual_seed(cfg.seed)
    sub: Tensor | None
    if cfg.init in INITS:
        sub = choose_sub_vocab(train, cfg.sub_vocab, eos) if cfg.sub_vocab else None
        # a small corpus may hold fewer distinct tokens than sub_vocab rows
        head_cfg = attrs.evolve(cfg.head, sub_vocab=int(sub.numel()) if sub is not None else 0)
        head = FeatureHead(target, head_cfg, sub).to(device)
        if cfg.init == "target":
            init_from_target(head, target)
    else:
        head = init_from_head(cfg.init, target, cfg.head).to(device)
        sub = _sub_ids(head)
    head.train()
    to_sub: Tensor | None = None
    if sub is not None:
        to_sub = torch.full((head.vocab_size,), -1, dtype=torch.long)
        to_sub[sub] = torch.arange(sub.numel())
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    history: list[dict[str, Any]] = []
    step, seconds = 0, 0.0
    ckpt = out / CHECKPOINT
    if ckpt.is_file():
        step, history, seconds = resume(ckpt, cfg, FeatureTrainConfig(), head, optimizer, device)

    def save() -> None:
        save_checkpoint(ckpt, cfg, step, history, seconds, head.trainable_state(), optimizer)

    lengths = [len(s.tokens) for s in train]
    epochs: dict[int, list[list[int]]] = {}
    t_train = time.perf_counter()
    budget_s = None if max_minutes is None else 60 * max_minutes - (t_train - t_start)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"feature head {cfg.variant} layers={list(cfg.layers)}",
               unit="step", disable=not progress)
    while step < cfg.steps:
        if budget_s is not None and time.perf_counter() - t_train >= budget_s:
            break
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = _batch_at(step, lengths, cfg, epochs)
        data = _collate([train[i] for i in batch], [feats[i] for i in batch], to_sub, device)
        loss, stats = _loss(head, data, cfg, autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        seconds += time.perf_counter() - t0
        history.append({"step": step, "loss": round(loss.item(), 4)} | {k: round(v, 4) for k, v in stats.items()})
        bar.set_postfix(loss=f"{loss.item():.3f}", top1=f"{stats['top1_1']:.3f}")
        bar.update(1)
        if step % cfg.save_every == 0 or step == cfg.steps:
            save()
    bar.close()
    save()
    finished = step >= cfg.steps
    recent = history[-20:]

    def mean(key: str) -> float | None:
        values = [h[key] for h in recent if key in h]
        return round(statistics.fmean(values), 4) if values else None

    report = {
        "finished": finished,
        "steps": step,
        "train_seconds": round(seconds, 1),
        "train_sequences": len(train),
        "train_positions": int(sum(lengths)),
        "train_positions_seen": int(sum(h["positions"] for h in history)),
        "final_train_loss": mean("loss"),
        "final_train_top1": {f"depth {k}": mean(f"top1_{k}") for k in range(1, cfg.unroll + 1)},
        "config": attrs.asdict(cfg),
        "autocast_bfloat16": autocast,
        "corpus_subset_sha256": corpus_hash(train),
    }
    if cfg.init not in INITS:  # what the warm start began from
        warm = json.loads((Path(cfg.init).expanduser() / STAGE_FILE).read_text())
        report["init_head"] = {"path": str(cfg.init), "weights": warm.get("weights"), "command": warm.get("command"),
                               "corpus_sha256": warm.get("corpus_sha256")}
    if finished:
        head.eval()
        save_feature_head(head, out, base=base, metadata={"training": report} | (metadata or {}))
    return report


@torch.inference_mode()
def feature_argmax_along(stage: Any, source: Any, prompt: list[int], continuation: list[int],
                         depths: int = 1) -> list[list[int]]:
    """Teacher forcing along ``continuation``: for each draft depth d = 1 .. ``depths``, the
    feature stage's argmax after ``prompt + continuation[:i]`` for every i, having read the
    source's real features up to d-1 positions before and its own predictions after (d = 1:
    the first token drafted after a verification). ``source`` is the ``HFStage`` the stage
    reads (its model computes the features, one forward, no cache)."""
    head: FeatureHead = stage.head
    ids = torch.tensor([prompt + continuation[:-1]], device=stage.device)
    f = source_features(source.model, ids.to(source.device), head.cfg.layers).to(stage.device)
    data = {"ids": ids, "f": f.to(head.reference_weight.dtype)}
    passes = _passes(head, data, depths, autocast=False)
    out = []
    start = len(prompt) - 1
    for h in passes:
        logits = head.logits(h[0, start:])[:, : stage.vocab_size]
        out.append([int(i) for i in logits.argmax(-1).tolist()])
    return out
