"""``FeatureStage``: a feature-level draft (``hf.feature_head``) as a pipeline ``Stage`` that
reads the hidden states of a stage above it (``FeatureReader``; SPEC "Feature-level drafts").

Because it is a ``Stage`` -- ``score(context, block)`` gives logits for a chain or a token tree
-- the pipeline samples it with ``AutoregressiveProposer`` and the ``tree`` wrapper grows token
trees from it, both unchanged: the rows a block carries are the transformed rows its tokens were
drawn from (trap 1).

Which feature each slot reads. Slot j (``hf.feature_head``) reads ``u_{j-1}``: the source's
feature of position j-1 when the source has consumed x_0 .. x_{j-1} (``FeatureSource.features``
matches tokens, so a feature of a token that is not in the context is never read), else the
draft's own prediction h^_{j-1} (the token the verifier emitted last, tokens a qualifier buffered
that the target has not scored, the draft's own tokens). When the source later provides the
real feature of a position whose slot used a stand-in, the draft recomputes from that slot on.
So a row is a deterministic function of the context and of the source's features for positions
of that context -- both fixed before the next token is drawn, never a function of that token
(trap 2) -- and the chain stays exact.

Caches. Its own KV cache holds slots 0 .. len(cached)-1 and is rolled back by common prefix, like
``HFStage``; a token tree's nodes follow them (node i at position L + depth) and are dropped by
the next call that does not grow the same tree (their slots read stand-ins, which the accepted
path's real features replace anyway). ``compile=True`` runs a pre-packed view and a buffer cache
(``hf.fast``), as ``HFStage`` does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pyramid_core.backends.hf.head import FeatureHead
from pyramid_core.protocols import FEATURE_FROM, FeatureSource
from pyramid_core.types import Block

__all__ = ["FeatureStage", "load_feature_stage"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    m = min(len(a), len(b))
    if a[:m] == b[:m]:
        return m
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


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
    compile:       the fast CPU execution mode (``hf.fast``)
    """

    def __init__(self, head: FeatureHead, tokenizer: Any = None, *, name: str = "feature",
                 features_from: str = "next", vocab_size: int | None = None, compile: bool = False) -> None:
        if features_from not in FEATURE_FROM:
            raise ValueError(f"stage {name!r}: features_from must be one of {', '.join(FEATURE_FROM)}, "
                             f"got {features_from!r}")
        self.head = head.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.feature_from = features_from
        self.feature_layers = tuple(head.cfg.layers)
        self.feature_width = int(head.feature_width)
        self.device: torch.device = head.fc.weight.device
        width = head.vocab_size
        if vocab_size is None:
            vocab_size = len(tokenizer) if tokenizer is not None else width
        if not 1 <= vocab_size <= width:
            raise ValueError(f"stage {name!r}: vocab_size {vocab_size} does not fit the head's {width} logit columns")
        self.vocab_size = int(vocab_size)
        self.compiled = bool(compile)
        self.runner: Any = head
        self.lm_head: Any = head.head_module()
        self._new_cache: Any = self._dynamic_cache
        if self.compiled:
            self._compile()
        self._source: FeatureSource | None = None
        self._cache: Any = self._new_cache()
        self.reset()

    # --- execution modes -------------------------------------------------------------------------

    def _dynamic_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.head.config)

    def _compile(self) -> None:
        from pyramid_core.backends.hf.fast import (
            PackedLinear,
            buffer_cache,
            packed_view,
            packing_available,
        )

        dtype = self.head.fc.weight.dtype
        if self.device.type != "cpu" or not packing_available() or dtype != torch.float32:
            raise ValueError(f"stage {self.name!r}: compile=true needs a float32 stage on a CPU with oneDNN "
                             f"(this one: {self.device}, {dtype}); use compile=false")
        self.runner = packed_view(self.head)
        head = self.head.head_module()
        if self.head.own_head is not None:
            self.lm_head = self.runner.own_head
        else:
            self.lm_head = PackedLinear(head.weight, getattr(head, "bias", None))  # type: ignore[arg-type]
        self._new_cache = lambda: buffer_cache(self.head.cfg.depth)

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
        if self.compiled and self._cache is not None:
            self._cache.reset()
        else:
            self._cache = self._new_cache()
        self._ids: list[int] = []  # tokens whose slots are cached (slot j read x_j)
        self._real: list[bool] = []  # slot j read the source's feature of position j-1
        self._h = torch.empty(0, self.head.hidden, device=self.device, dtype=self.head.fc.weight.dtype)  # h^ per slot
        self._slots = 0  # linear slots in the KV cache (tree nodes follow)
        self._tree: tuple[list[int], list[int]] | None = None
        self._tree_h: Tensor | None = None
        self._tree_rows: Tensor | None = None
        self._root = self._h  # the fused feature the tree's root children read

    @property
    def cached_tokens(self) -> tuple[int, ...]:
        return tuple(self._ids)

    @property
    def real_feature_slots(self) -> tuple[bool, ...]:
        """Per cached slot, whether it read the source's feature (False: a stand-in)."""
        return tuple(self._real)

    def predicted_features(self) -> Tensor:
        """``Float[Tensor, "slots H"]``: h^ of every cached slot (for tests)."""
        return self._h

    def kv_state(self) -> list[tuple[Tensor, Tensor]]:
        """(keys, values) per head layer for the cached slots, ``Float[Tensor, "heads slots d"]``."""
        layers = getattr(self._cache, "layers", [])
        return [(layer.keys[0, :, : self._slots], layer.values[0, :, : self._slots]) for layer in layers
                if getattr(layer, "keys", None) is not None]

    def _crop(self, keep: int) -> None:
        """Keep linear slots 0 .. keep-1 (and drop any tree)."""
        total = self._slots + (len(self._tree[0]) if self._tree is not None else 0)
        if keep < total:
            if keep == 0:
                if self.compiled:
                    self._cache.reset()
                else:
                    self._cache = self._new_cache()
            else:
                self._cache.crop(keep - total)
        self._tree = self._tree_h = self._tree_rows = None
        self._slots = min(self._slots, keep)
        del self._ids[keep:], self._real[keep:]
        self._h = self._h[:keep]

    # --- the forward -----------------------------------------------------------------------------

    def _run(self, u_prev: Tensor, tokens: list[int], first: int, mask: Tensor | None) -> Tensor:
        """h^ for slots reading ``u_prev`` (``Float[Tensor, "s H"]``) and ``tokens``; the first
        at position ``first``. ``mask`` as in ``FeatureHead.slots`` (None: causal)."""
        s = len(tokens)
        positions = torch.arange(first, first + s, device=self.device).unsqueeze(0)
        ids = torch.tensor([tokens], device=self.device)
        try:
            h: Tensor = self.runner.slots(u_prev.unsqueeze(0), ids, positions, mask=mask, cache=self._cache)
        except BaseException:
            self.reset()
            raise
        return h[0]

    def _source_features(self, full: list[int], context: Tensor, start: int) -> tuple[int, Tensor | None]:
        """(m, fused features of positions start .. m-1): what the source has for ``full``."""
        if self._source is None:
            return 0, None
        raw = self._source.features(context, start, self.feature_layers)
        if raw.shape[0] == 0:
            return start, None
        return start + int(raw.shape[0]), self.runner.fuse_features(raw.to(self.device, self._h.dtype))

    def _advance(self, full: list[int], context: Tensor) -> tuple[int, Tensor | None, int]:
        """Bring the cached slots up to every slot of ``full``; returns (m, fused features of
        positions p0 .. m-1, p0) as the source gave them for ``full``."""
        keep = _common_prefix(self._ids, full)
        standin = next((j for j in range(keep) if not self._real[j]), keep)
        p0 = max(0, min(keep, standin) - 1)
        m, feats = self._source_features(full, context, p0)
        # a slot that read a stand-in where the source now has the real feature is recomputed
        redo = next((j for j in range(standin, keep) if not self._real[j] and 1 <= j <= m), keep)
        keep = min(keep, redo)
        self._crop(keep)
        zero = torch.zeros(1, self.head.hidden, device=self.device, dtype=self._h.dtype)
        j = keep
        end = len(full)
        if j < end and j <= m:  # slots that read real features (or slot 0's zeros): one forward
            stop = min(end, m + 1)
            parts = [zero] if j == 0 else []
            if stop > max(j, 1):
                assert feats is not None
                parts.append(feats[max(j, 1) - 1 - p0: stop - 1 - p0])
            h = self._run(torch.cat(parts), full[j:stop], j, _causal(stop - j, self._slots, self.device))
            self._append(full[j:stop], [True] * (stop - j), h)
            j = stop
        while j < end:  # stand-ins: slot j reads h^_{j-1}, computed just before
            h = self._run(self._h[j - 1: j], full[j: j + 1], j, None)
            self._append(full[j: j + 1], [False], h)
            j += 1
        return m, feats, p0

    def _append(self, tokens: list[int], real: list[bool], h: Tensor) -> None:
        self._ids += tokens
        self._real += real
        self._h = torch.cat([self._h, h])
        self._slots += len(tokens)

    def _logits(self, h: Tensor) -> Tensor:
        out: Tensor = self.runner.logits(h, self.lm_head)
        return out[:, : self.vocab_size]

    @torch.inference_mode()
    def score(self, context: Tensor, block: Block | None = None) -> Tensor:
        """Logits ``Float[Tensor, "n+1 vocab"]`` (the ``Stage`` row convention): row 0 after
        ``context``, row i+1 after node i (a chain's token i, or a tree's root-to-node-i path)."""
        ids: list[int] = context.tolist()
        if not ids:
            raise ValueError(f"stage {self.name!r}: the context is empty (give at least one token)")
        if block is not None and len(block) and block.parents is not None:
            return self._score_tree(ids, context, block)
        n = 0 if block is None else len(block)
        full = ids + (block.tokens.tolist() if block is not None and n else [])
        full_t = torch.cat([context, block.tokens.to(context.device)]) if block is not None and n else context
        if self._tree is not None:
            self._crop(self._slots)
        self._advance(full, full_t)
        return self._logits(self._h[len(ids) - 1: len(full)])

    def _score_tree(self, ids: list[int], context: Tensor, block: Block) -> Tensor:
        assert block.parents is not None
        tokens: list[int] = block.tokens.tolist()
        parents: list[int] = block.parents.tolist()
        cached = self._tree
        grown = cached is not None and ids == self._ids and tokens[: len(cached[0])] == cached[0] \
            and parents[: len(cached[1])] == cached[1]
        if grown:
            assert cached is not None and self._tree_h is not None and self._tree_rows is not None
            first = len(cached[0])
            h_nodes, rows = self._tree_h, self._tree_rows
        else:
            if cached is not None:
                self._crop(self._slots)
            m, feats, p0 = self._advance(ids, context)
            first, length = 0, len(ids)
            # the root's children read the feature of position L-1: the source's if it has it
            root = feats[length - 1 - p0: length - p0] if feats is not None and m >= length else self._h[length - 1:]
            h_nodes = torch.empty(0, self.head.hidden, device=self.device, dtype=self._h.dtype)
            rows = self._logits(self._h[length - 1:])
            self._root = root
        length = len(ids)
        depths: list[int] = []
        for p in parents:
            depths.append(depths[p] + 1 if p >= 0 else 0)
        lineage: list[list[int]] = []
        for node, p in enumerate(parents):
            lineage.append((lineage[p] if p >= 0 else []) + [node])
        node = first
        while node < len(tokens):  # one forward per depth: a node's parent is computed before it
            depth = depths[node]
            group = list(range(node, len(tokens)))
            group = [i for i in group if depths[i] == depth]
            group = group[: next((k for k, i in enumerate(group) if i != node + k), len(group))]
            u = torch.cat([self._root if parents[i] < 0 else h_nodes[parents[i]: parents[i] + 1] for i in group])
            keys = length + node + len(group)
            mask = torch.zeros(len(group), keys, dtype=torch.bool, device=self.device)
            mask[:, :length] = True
            for r, i in enumerate(group):
                mask[r, [length + a for a in lineage[i]]] = True
            positions = torch.tensor([[length + depths[i] for i in group]], device=self.device)
            x = torch.tensor([[tokens[i] for i in group]], device=self.device)
            try:
                h = self.runner.slots(u.unsqueeze(0), x, positions, mask=mask[None, None], cache=self._cache)[0]
            except BaseException:
                self.reset()
                raise
            h_nodes = torch.cat([h_nodes, h])
            rows = torch.cat([rows, self._logits(h)])
            node += len(group)
        self._tree = (tokens, parents)
        self._tree_h, self._tree_rows = h_nodes, rows
        return rows

    def __repr__(self) -> str:
        return (f"FeatureStage(name={self.name!r}, variant={self.head.cfg.variant}, layers={list(self.feature_layers)}, "
                f"features_from={self.feature_from}, vocab_size={self.vocab_size}, compiled={self.compiled})")


def load_feature_stage(path: str, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                       features_from: str = "next", compile: bool = False, name: str | None = None) -> FeatureStage:
    """The trained feature head in folder ``path`` (``hf.feature_head``) as a stage, on its base
    model loaded through ``load_model`` -- the same model object as a target stage loaded from
    the same (path, device, dtype), so the embedding and a shared head are not duplicated."""
    from pathlib import Path

    from pyramid_core.backends.hf.head import feature_base, load_feature_head
    from pyramid_core.backends.hf.loading import load_model, load_tokenizer

    folder = Path(path).expanduser()
    base_dir = feature_base(folder)
    base = load_model(base_dir, device=device, dtype=dtype)
    head = load_feature_head(folder, base)
    return FeatureStage(head, load_tokenizer(base_dir), name=name or folder.name, features_from=features_from,
                        compile=compile)
