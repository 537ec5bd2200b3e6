"""``FeatureStage``: a feature-level draft (``backends.hf.head``) as a pipeline ``Stage`` that
reads the hidden states of a stage above it (``FeatureReader``;
[feature-level drafts](../../algorithms.md#feature-level-drafts)).

Because it is a ``Stage`` -- ``score(context, block)`` gives logits for a chain or a token tree
-- the pipeline samples it with ``AutoregressiveProposer`` and the ``tree`` wrapper grows token
trees from it, both unchanged: the rows a block carries are the transformed rows its tokens were
drawn from (trap 1).

Which feature each slot reads. Slot j (``backends.hf.head``) reads ``u_{j-1}``: the source's
feature of position j-1 when the source has consumed x_0 .. x_{j-1} (``FeatureSource.features``
matches tokens, so a feature of a token that is not in the context is never read), else the
draft's own prediction h^_{j-1} (the token the verifier emitted last, tokens a qualifier buffered
that the target has not scored, the draft's own tokens). When the source later provides the
real feature of a position whose slot used a stand-in, the draft recomputes from that slot on.
So a row is a deterministic function of the context and of the source's features for positions
of that context -- both fixed before the next token is drawn, never a function of that token
(trap 2) -- and the chain stays exact.

Caches. One ``StageCache`` (``backends.hf.cache``) holds the head's keys and values, its h^ per
slot (track ``"h"``) and whether each slot read a real feature (track ``"real"``), rolled back by
the cached prefix like ``HFStage``'s; a token tree's nodes follow the linear slots (node i at
position L + depth) and are dropped by the next call that does not grow the same tree (their
slots read stand-ins, which the accepted path's real features replace anyway).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from pyramid_core.backends.hf.cache import StageCache
from pyramid_core.backends.hf.choice import ModeChoice, choose_modes, fingerprint
from pyramid_core.backends.hf.fast import PackedLinear, packed_view
from pyramid_core.backends.hf.head import FeatureHead, feature_base, load_feature_head
from pyramid_core.backends.hf.hub import location_label, resolve_model_dir
from pyramid_core.backends.hf.loading import load_model, load_tokenizer
from pyramid_core.backends.hf.runtime import measured_candidates, resolve_mode
from pyramid_core.backends.hf.speculators import (
    is_speculators_dir,
    load_speculators_head,
    speculators_base,
)
from pyramid_core.backends.hf.stage import PROBE_CONTEXT
from pyramid_core.devices import sync
from pyramid_core.options import ExecutionMode
from pyramid_core.protocols import FEATURE_FROM, FeatureSource
from pyramid_core.types import Block

__all__ = ["FeatureStage", "load_feature_stage"]

HEAD_MODES = frozenset({ExecutionMode.EAGER, ExecutionMode.FAST})
"""The execution modes of a feature head (its forwards are not captured as graphs yet)."""

H, REAL = "h", "real"
"""``StageCache`` tracks: h^ per slot (``Float[Tensor, "slots H"]``), and whether the slot read
the source's feature (``Bool[Tensor, "slots"]``; False: a stand-in)."""


def _causal(new: int, cached: int, device: torch.device) -> Tensor | None:
    """``Bool[Tensor, "1 1 new cached+new"]`` causal mask after ``cached`` keys (None for one
    slot, which sees every key)."""
    if new == 1:
        return None
    keys = torch.arange(cached + new, device=device)
    return (keys.unsqueeze(0) <= torch.arange(cached, cached + new, device=device).unsqueeze(1))[None, None]


class FeatureStage:
    """A ``Stage`` and ``FeatureReader`` around a ``FeatureHead`` (module docstring).

    head:          the trained (or freshly initialised) head, on its base model
    tokenizer:     the base model's (compared across stages before decoding)
    features_from: ``"next"`` (the stage it hands its blocks to, default) or ``"target"``
    compile:       the execution mode (``ExecutionMode``), resolved once here
    """

    def __init__(self, head: FeatureHead, tokenizer: Any = None, *, name: str = "feature",
                 features_from: str = "next", vocab_size: int | None = None,
                 compile: ExecutionMode | bool | str = ExecutionMode.EAGER) -> None:
        if features_from not in FEATURE_FROM:
            raise ValueError(f"stage {name!r}: features_from must be one of {', '.join(FEATURE_FROM)}, "
                             f"got {features_from!r}")
        self.head = head.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.feature_from = features_from
        self.feature_layers = tuple(head.cfg.layers)
        self.feature_width = int(head.feature_width)
        self.device: torch.device = head.reference_weight.device
        self.dtype: torch.dtype = head.reference_weight.dtype
        width = head.vocab_size
        if vocab_size is None:
            vocab_size = len(tokenizer) if tokenizer is not None else width
        if not 1 <= vocab_size <= width:
            raise ValueError(f"stage {name!r}: vocab_size {vocab_size} does not fit the head's {width} logit columns")
        self.vocab_size = int(vocab_size)
        self.mode = resolve_mode(ExecutionMode.parse(compile), self.device, self.dtype, name, HEAD_MODES)
        self._cache = StageCache(head.cfg.depth)
        self.choice: ModeChoice | None = None
        self._runners: dict[ExecutionMode, tuple[Any, Any]] = {}  # built while timing (``AUTO``)
        if self.mode is ExecutionMode.AUTO:  # one mode for the stage: a head drafts a token per forward
            key = fingerprint(head, kind="feature-head", dtype=self.dtype, device=self.device, layers=head.cfg.depth)
            self.choice = choose_modes(key, self._time_mode, measured_candidates(self.device, self.dtype, HEAD_MODES))
            self.mode = self.choice.mode_for(1)
            self._cache.reset()
        self.runner, self.lm_head = self._runners.get(self.mode) or self._runner(self.mode)
        self._runners.clear()
        self._source: FeatureSource | None = None
        self._root: Tensor | None = None  # the fused feature the cached tree's root children read

    def _runner(self, mode: ExecutionMode) -> tuple[Any, Any]:
        """(the module whose ``slots`` / ``logits`` run the forwards, the LM head) in ``mode``."""
        head = self.head
        lm_head: Any = head.head_module()
        if mode is not ExecutionMode.FAST:
            return head, lm_head
        runner = packed_view(head)
        if head.own_head is not None:
            return runner, runner.own_head
        return runner, PackedLinear(lm_head.weight, getattr(lm_head, "bias", None))

    @torch.inference_mode()
    def _time_mode(self, mode: ExecutionMode, m: int) -> float:
        """Seconds of one forward of ``m`` slots in ``mode`` after ``PROBE_CONTEXT`` cached ones,
        logits included (``backends.hf.choice``)."""
        runner, lm_head = self._runners.get(mode) or self._runners.setdefault(mode, self._runner(mode))
        cache = self._cache
        hidden = torch.zeros(1, m, self.head.hidden, device=self.device, dtype=self.dtype)
        if cache.length != PROBE_CONTEXT:
            cache.reset()
            ctx = torch.zeros(1, PROBE_CONTEXT, self.head.hidden, device=self.device, dtype=self.dtype)
            ids = torch.arange(PROBE_CONTEXT) % self.vocab_size
            runner.slots(ctx, ids.to(self.device).unsqueeze(0), torch.arange(PROBE_CONTEXT, device=self.device)
                         .unsqueeze(0), mask=_causal(PROBE_CONTEXT, 0, self.device), cache=cache.kv)
            cache.write_ids(0, ids)
        tokens = ((torch.arange(m) * 7 + 3) % self.vocab_size).to(self.device).unsqueeze(0)
        positions = torch.arange(PROBE_CONTEXT, PROBE_CONTEXT + m, device=self.device).unsqueeze(0)
        sync(self.device)
        start = time.perf_counter()
        h = runner.slots(hidden, tokens, positions, mask=_causal(m, PROBE_CONTEXT, self.device), cache=cache.kv)
        runner.logits(h[0], lm_head)
        sync(self.device)
        seconds = time.perf_counter() - start
        cache.truncate(PROBE_CONTEXT)
        return seconds

    @property
    def compiled(self) -> bool:
        """Whether the forwards run in the fast mode."""
        return self.mode is ExecutionMode.FAST

    # --- FeatureReader ---------------------------------------------------------------------------

    def attach(self, source: FeatureSource) -> None:
        """Read features from ``source`` from now on (a new source forgets the caches)."""
        if source is not self._source:
            self._source = source
            self.reset()

    @property
    def source(self) -> FeatureSource | None:
        return self._source

    # --- state -----------------------------------------------------------------------------------

    def reset(self) -> None:
        self._cache.reset()
        self._root = None

    @property
    def cached_tokens(self) -> tuple[int, ...]:
        return tuple(self._cache.ids.tolist())

    def _slice(self, name: str, start: int, end: int) -> Tensor:
        if end <= start:
            shape = (0,) if name == REAL else (0, self.head.hidden)
            return torch.empty(shape, device=self.device, dtype=torch.bool if name == REAL else self.dtype)
        return self._cache.track(name, slice(start, end))

    @property
    def real_feature_slots(self) -> tuple[bool, ...]:
        """Per cached slot, whether it read the source's feature (False: a stand-in)."""
        return tuple(self._slice(REAL, 0, self._cache.length).tolist())

    def predicted_features(self) -> Tensor:
        """``Float[Tensor, "slots H"]``: h^ of every cached slot (for tests)."""
        return self._slice(H, 0, self._cache.length)

    def kv_state(self) -> list[tuple[Tensor, Tensor]]:
        """(keys, values) per head layer for the cached slots, ``Float[Tensor, "heads slots d"]``."""
        return self._cache.kv_state()

    # --- the forward -----------------------------------------------------------------------------

    def _run(self, u_prev: Tensor, tokens: Tensor, first: int, mask: Tensor | None) -> Tensor:
        """h^ for slots reading ``u_prev`` (``Float[Tensor, "s H"]``) and ``tokens``; the first
        at position ``first``. ``mask`` as in ``FeatureHead.slots`` (None: causal)."""
        s = int(tokens.numel())
        positions = torch.arange(first, first + s, device=self.device).unsqueeze(0)
        try:
            h: Tensor = self.runner.slots(u_prev.unsqueeze(0), tokens.to(self.device).unsqueeze(0), positions,
                                          mask=mask, cache=self._cache.kv)
        except BaseException:
            self.reset()
            raise
        return h[0]

    def _source_features(self, context: Tensor, start: int) -> tuple[int, Tensor | None]:
        """(m, fused features of positions start .. m-1): what the source has for ``context``."""
        if self._source is None:
            return 0, None
        raw = self._source.features(context, start, self.feature_layers)
        if raw.shape[0] == 0:
            return start, None
        return start + int(raw.shape[0]), self.runner.fuse_features(raw.to(self.device, self.dtype))

    def _advance(self, full: Tensor) -> tuple[int, Tensor | None, int]:
        """Bring the cached slots up to every slot of ``full``; returns (m, fused features of
        positions p0 .. m-1, p0) as the source gave them for ``full``."""
        cache = self._cache
        keep = cache.prefix(full)
        real = self._slice(REAL, 0, keep).cpu()
        standin = int((~real).nonzero()[0, 0]) if bool((~real).any()) else keep
        p0 = max(0, min(keep, standin) - 1)
        m, feats = self._source_features(full, p0)
        # a slot that read a stand-in where the source now has the real feature is recomputed
        index = torch.arange(standin, keep)
        redo = (~real[standin:keep]) & (index >= 1) & (index <= m)
        keep = int(index[redo][0]) if bool(redo.any()) else keep
        cache.truncate(keep)
        j, end = keep, int(full.numel())
        if j < end and j <= m:  # slots that read real features (or slot 0's zeros): one forward
            stop = min(end, m + 1)
            parts = [torch.zeros(1, self.head.hidden, device=self.device, dtype=self.dtype)] if j == 0 else []
            if stop > max(j, 1):
                assert feats is not None
                parts.append(feats[max(j, 1) - 1 - p0: stop - 1 - p0])
            h = self._run(torch.cat(parts), full[j:stop], j, _causal(stop - j, cache.length, self.device))
            self._append(j, full[j:stop], True, h)
            j = stop
        while j < end:  # stand-ins: slot j reads h^_{j-1}, computed just before
            h = self._run(self._slice(H, j - 1, j), full[j: j + 1], j, None)
            self._append(j, full[j: j + 1], False, h)
            j += 1
        return m, feats, p0

    def _append(self, start: int, tokens: Tensor, real: bool, h: Tensor) -> None:
        cache = self._cache
        cache.write_track(H, start, h)
        cache.write_track(REAL, start, torch.full((h.shape[0],), real, dtype=torch.bool, device=self.device))
        cache.write_ids(start, tokens)

    def _logits(self, h: Tensor) -> Tensor:
        out: Tensor = self.runner.logits(h, self.lm_head)
        return out[:, : self.vocab_size]

    @torch.inference_mode()
    def score(self, context: Tensor, block: Block | None = None) -> Tensor:
        """Logits ``Float[Tensor, "n+1 vocab"]`` (the ``Stage`` row convention): row 0 after
        ``context``, row i+1 after node i (a chain's token i, or a tree's root-to-node-i path)."""
        length = int(context.numel())
        if not length:
            raise ValueError(f"stage {self.name!r}: the context is empty (give at least one token)")
        if block is not None and len(block) and block.tree is not None:
            return self._score_tree(context.cpu(), block)
        n = 0 if block is None else len(block)
        full = torch.cat([context.cpu(), block.tokens.cpu()]) if block is not None and n else context.cpu()
        self._cache.drop_tree()
        self._advance(full)
        return self._logits(self._slice(H, length - 1, length + n))

    def _score_tree(self, context: Tensor, block: Block) -> Tensor:
        tree = block.tree
        assert tree is not None
        tokens: list[int] = block.tokens.tolist()
        cache, length = self._cache, int(context.numel())
        cached = cache.tree
        grown = cached is not None and cache.length == length and cache.prefix(context) == length \
            and tokens[: len(cache.tree_tokens)] == cache.tree_tokens \
            and tree.parents[: len(cached.parents)] == cached.parents
        if grown:
            assert cache.tree_rows is not None and self._root is not None
            first = len(cache.tree_tokens)
            h_nodes, rows, root = self._slice(H, length, length + first), cache.tree_rows, self._root
        else:
            cache.drop_tree()
            m, feats, p0 = self._advance(context)
            first = 0
            # the root's children read the feature of position L-1: the source's if it has it
            root = feats[length - 1 - p0: length - p0] if feats is not None and m >= length \
                else self._slice(H, length - 1, length)
            h_nodes = self._slice(H, length, length)
            rows = self._logits(self._slice(H, length - 1, length))
            self._root = root
        ancestors = tree.ancestor_mask().to(self.device)
        node, n = first, len(tokens)
        while node < n:  # one forward per depth: a node's parent is computed before it
            depth = tree.depths[node]
            end = node
            while end < n and tree.depths[end] == depth:
                end += 1
            group = range(node, end)
            u = torch.cat([root if tree.parents[i] < 0 else h_nodes[tree.parents[i]: tree.parents[i] + 1]
                           for i in group])
            mask = torch.zeros(len(group), length + end, dtype=torch.bool, device=self.device)
            mask[:, :length] = True
            mask[:, length:] = ancestors[node:end, :end]
            positions = torch.tensor([[length + depth] * len(group)], device=self.device)
            x = block.tokens[node:end].to(self.device).unsqueeze(0)
            try:
                h = self.runner.slots(u.unsqueeze(0), x, positions, mask=mask[None, None], cache=cache.kv)[0]
            except BaseException:
                self.reset()
                raise
            h_nodes = torch.cat([h_nodes, h])
            rows = torch.cat([rows, self._logits(h)])
            node = end
        cache.write_track(H, length, h_nodes)
        cache.set_tree(tree, tokens, rows)
        return rows

    def __repr__(self) -> str:
        return (f"FeatureStage(name={self.name!r}, variant={self.head.cfg.variant}, layers={list(self.feature_layers)}, "
                f"features_from={self.feature_from}, vocab_size={self.vocab_size}, mode={self.mode.value})")


def load_feature_stage(path: str, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                       features_from: str = "next", compile: ExecutionMode | bool | str = ExecutionMode.EAGER,
                       name: str | None = None, base: str | None = None) -> FeatureStage:
    """The trained feature head in folder ``path`` (``backends.hf.head``, or an EAGLE-3 head in
    the speculators format, ``backends.hf.speculators``; or a Hugging Face id,
    ``hub.resolve_model_dir``) as a stage, on its base model (``base``: another directory or id
    than the head records) loaded through ``load_model`` -- the same model object as a target
    stage loaded from the same (path, device, dtype), so the embedding and a shared head are not
    duplicated."""
    folder = resolve_model_dir(path)
    speculators = is_speculators_dir(folder)
    if base:
        base_dir = resolve_model_dir(base)
    else:
        base_dir = speculators_base(folder) if speculators else feature_base(folder)
    model = load_model(base_dir, device=device, dtype=dtype)
    head = load_speculators_head(folder, model) if speculators else load_feature_head(folder, model)
    return FeatureStage(head, load_tokenizer(base_dir), name=name or location_label(folder), features_from=features_from,
                        compile=compile)
