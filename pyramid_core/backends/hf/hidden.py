"""The features an ``HFStage`` keeps for a feature-reading draft (SPEC "Feature-level drafts").

With features enabled the stage asks its forwards -- the ones it runs anyway -- for their hidden
states and keeps the chosen layers' states of every fed position in a ``FeatureBuffer``, aligned
with its cached tokens: rolled back with the KV cache, and gathered with it when a token tree is
compacted (like ``hf.fast.BufferLayer``).

Layer numbering: ``-1`` is the final-normed state the LM head reads (EAGLE-1's feature); ``i`` in
``0 .. L-2`` is the output of decoder layer i (EAGLE-3 fuses a low, a middle and a high one).
Hugging Face returns ``L + 1`` hidden states -- the embeddings, the outputs of layers 0 .. L-2,
then the normed output of the last layer -- so the last layer's output exists only normed, as
``-1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FeatureBuffer", "check_feature_layers"]


def check_feature_layers(layers: tuple[int, ...], num_layers: int, stage: str) -> tuple[int, ...]:
    """``layers`` as a tuple of valid, distinct layer numbers of a model with ``num_layers``
    decoder layers (``ValueError`` naming the stage and the valid numbers otherwise)."""
    layers = tuple(int(i) for i in layers)
    valid = f"-1 (the final-normed state) or 0..{num_layers - 2} (a decoder layer's output)"
    for i in layers:
        if i != -1 and not 0 <= i <= num_layers - 2:
            last = f"; layer {num_layers - 1}'s output exists only normed, as -1" if i == num_layers - 1 else ""
            raise ValueError(f"stage {stage!r} has no feature layer {i}: valid are {valid}{last}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"stage {stage!r}: feature layers must be distinct, got {list(layers)}")
    return layers


class FeatureBuffer:
    """Features of the enabled layers for the stage's cached positions (and cached tree nodes).

    linear: ``Float[Tensor, "n layers hidden"]`` for cached positions 0 .. n-1 (a view of a
    buffer that doubles when full); tree: ``Float[Tensor, "nodes layers hidden"]`` for the nodes
    of a cached token tree, in node order."""

    def __init__(self, num_layers: int, hidden: int, stage: str) -> None:
        self.num_layers, self.hidden, self.stage = num_layers, hidden, stage
        self.layers: tuple[int, ...] = ()
        self._index: list[int] = []  # positions in Hugging Face's hidden-state tuple
        self._buf: Tensor | None = None
        self.n = 0
        self.tree: Tensor | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    def set_layers(self, layers: tuple[int, ...]) -> None:
        layers = check_feature_layers(layers, self.num_layers, self.stage)
        if layers != self.layers:
            self.layers = layers
            self._index = [self.num_layers if i == -1 else i + 1 for i in layers]
            self.reset()

    def reset(self) -> None:
        self.n = 0
        self.tree = None
        if self._buf is not None and self._buf.shape[1] != len(self.layers):
            self._buf = None

    def crop(self, keep: int) -> None:
        self.n = min(self.n, keep)

    def _stack(self, hidden_states: tuple[Tensor, ...], first: int, count: int) -> Tensor:
        """``Float[Tensor, "count layers hidden"]``: fed positions first .. first+count-1."""
        return torch.stack([hidden_states[i][0, first: first + count] for i in self._index], dim=1)

    def write(self, start: int, hidden_states: tuple[Tensor, ...], count: int) -> None:
        """The features of a forward that fed ``count`` linear positions ``start ..`` (its first
        ``count`` inputs); positions from ``start`` on are replaced."""
        if count <= 0 or start > self.n:  # nothing fed, or a gap: positions >= n stay unknown
            self.n = min(self.n, start)
            return
        new = self._stack(hidden_states, 0, count)
        end = start + count
        buf = self._buf
        if buf is None or buf.shape[0] < end or buf.dtype != new.dtype or buf.device != new.device:
            capacity = max(256, end, 2 * (buf.shape[0] if buf is not None else 0))
            grown = new.new_empty((capacity, len(self.layers), self.hidden))
            if buf is not None and start:
                grown[:start] = buf[:start].to(grown)
            buf = self._buf = grown
        buf[start:end] = new
        self.n = end

    def write_tree(self, first: int, hidden_states: tuple[Tensor, ...], offset: int, count: int) -> None:
        """Features of tree nodes ``first .. first+count-1``: the forward's inputs from
        ``offset`` on (nodes before ``first`` are kept)."""
        new = self._stack(hidden_states, offset, count)
        old = self.tree if self.tree is not None and first else None
        self.tree = new if old is None else torch.cat([old[:first], new])

    def settle(self, base: int, path: list[int]) -> None:
        """Tree compaction: the nodes ``path`` become linear positions ``base ..``; the tree goes."""
        if path and self.tree is not None and self._buf is not None:
            end = base + len(path)
            if self._buf.shape[0] < end:
                grown = self._buf.new_empty((max(end, 2 * self._buf.shape[0]), *self._buf.shape[1:]))
                grown[:base] = self._buf[:base]
                self._buf = grown
            self._buf[base:end] = self.tree[torch.tensor(path, device=self.tree.device)]
            self.n = end
        else:
            self.n = min(self.n, base)
        self.tree = None

    def gather(self, linear: int, nodes: list[int], start: int, layers: tuple[int, ...]) -> Tensor:
        """``Float[Tensor, "m-start width"]`` for linear positions ``start .. linear-1`` then the
        tree nodes ``nodes`` (positions ``linear ..``), layers ``layers`` (enabled ones) in order."""
        parts: list[Tensor] = []
        if self._buf is not None and start < linear:
            parts.append(self._buf[start:linear])
        picked = nodes[max(0, start - linear):]
        if picked and self.tree is not None:
            parts.append(self.tree[torch.tensor(picked, dtype=torch.long, device=self.tree.device)])
        if not parts:
            device = self._buf.device if self._buf is not None else torch.device("cpu")
            return torch.empty(0, len(layers) * self.hidden, device=device)
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        if layers != self.layers:
            try:
                pick = [self.layers.index(i) for i in layers]
            except ValueError:
                raise ValueError(f"stage {self.stage!r} keeps feature layers {list(self.layers)}, "
                                 f"not {list(layers)}") from None
            out = out[:, pick]
        return out.reshape(out.shape[0], -1)
