"""``StageCache``: the one cache of every model stage, addressed by slot.

A stage consumes tokens slot by slot. Slot ``s`` of the linear context holds position ``s``: its
token id, its keys and values in every layer, and whatever else the stage keeps per position
(hidden features, a draft head's own predicted feature). A token tree scored after the context
occupies the slots after it in node order (node i at position ``length + depth_i``). Everything
lives in preallocated buffers that grow by doubling, so:

- rolling back to ``n`` positions is ``truncate(n)``: the fill position moves, nothing is copied;
- compacting a tree onto the path the next context follows is ``keep(index)``: one gather of the
  kept slots to the front, in every buffer at once;
- what a new context can reuse is ``reuse(context)``: one vectorised comparison of its ids with
  the cached ones (no Python list of the context is made).

The keys and values are handed to a Hugging Face model through ``kv``, a ``transformers`` cache
of ``SlotLayer`` objects: each writes what a forward feeds at the current fill position and
gives attention views of the filled part (never a concatenation of the whole cache). Extra
per-slot buffers are ``tracks``: a track is written by the stage and truncated and gathered
with the keys and values.
"""

from __future__ import annotations

import functools
from typing import Any

import attrs
import torch
from torch import Tensor

from pyramid_core.tree import TokenTree

__all__ = ["StageCache", "StaticShape", "slot_layer_class", "fixed_slot_layer_class", "INITIAL_SLOTS"]

INITIAL_SLOTS = 256
"""Slots a buffer is created with; it doubles when full."""


def _grow(buf: Tensor, filled: int, need: int, dim: int) -> Tensor:
    """``buf`` with room for ``need`` entries along ``dim`` (its first ``filled`` kept)."""
    size = buf.shape[dim]
    if need <= size:
        return buf
    shape = list(buf.shape)
    shape[dim] = max(need, 2 * size)
    new = buf.new_empty(shape)
    new.narrow(dim, 0, filled).copy_(buf.narrow(dim, 0, filled))
    return new


@functools.cache
def slot_layer_class() -> Any:
    """The ``SlotLayer`` class: a ``transformers`` ``DynamicLayer`` over a preallocated buffer."""
    from transformers.cache_utils import DynamicLayer  # lazy: transformers

    base: Any = DynamicLayer

    class SlotLayer(base):  # type: ignore[misc]
        """Keys and values ``Float[Tensor, "1 heads slots head_dim"]`` of one layer; ``update``
        writes the fed slots at the fill position ``n`` and returns views of slots ``0 .. n``."""

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            self.device = key_states.device
            shape = (*key_states.shape[:-2], INITIAL_SLOTS, key_states.shape[-1])
            self._k, self._v = key_states.new_empty(shape), value_states.new_empty(shape)
            self.n = 0
            self._views()
            self.is_initialized = True

        def _views(self) -> None:
            self.keys, self.values = self._k[..., : self.n, :], self._v[..., : self.n, :]

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
                   **kwargs: Any) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.n + key_states.shape[-2]
            self._k = _grow(self._k, self.n, end, -2)
            self._v = _grow(self._v, self.n, end, -2)
            self._k[..., self.n : end, :] = key_states
            self._v[..., self.n : end, :] = value_states
            self.n = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.n if self.is_initialized else 0

        def crop(self, max_length: int) -> None:
            """transformers' crop: a negative value drops that many slots, else keep so many."""
            if self.is_initialized:
                self.truncate(self.n + max_length if max_length < 0 else max_length)

        def truncate(self, n: int) -> None:
            if self.is_initialized and n < self.n:
                self.n = max(0, n)
                self._views()

        def keep(self, index: Tensor) -> None:
            """Slots ``index`` (in this order) become slots ``0 .. len(index)-1``."""
            if not self.is_initialized:
                return
            where = index.to(self._k.device)
            m = int(where.numel())
            self._k[..., :m, :] = self._k.index_select(-2, where)
            self._v[..., :m, :] = self._v.index_select(-2, where)
            self.n = m
            self._views()

        def reset(self) -> None:
            self.truncate(0)

    return SlotLayer


@functools.cache
def fixed_slot_layer_class() -> Any:
    """The ``FixedSlotLayer`` class: keys and values in fixed buffers, written at ``at``."""
    from transformers.cache_utils import DynamicLayer  # lazy: transformers

    base: Any = DynamicLayer

    class FixedSlotLayer(base):  # type: ignore[misc]
        """Keys and values ``Float[Tensor, "1 heads capacity head_dim"]`` that never move (a CUDA
        graph holds their addresses): ``update`` writes the fed slots at the slots in ``at``
        (a device tensor) and returns the whole buffers; attention masks what is not filled."""

        def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
            # zeros, not empty: a masked slot is multiplied by 0, and 0 * NaN would be NaN
            self._k = torch.zeros(shape, dtype=dtype, device=device)
            self._v = torch.zeros(shape, dtype=dtype, device=device)
            self.keys, self.values = self._k, self._v
            self.device, self.dtype = device, dtype
            self.is_initialized = True
            self.n = 0
            self.at: Tensor | None = None

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
                   **kwargs: Any) -> tuple[Tensor, Tensor]:
            assert self.at is not None, "FixedSlotLayer: set the write slots (StageCache.write_at) first"
            self._k.index_copy_(-2, self.at, key_states)
            self._v.index_copy_(-2, self.at, value_states)
            return self._k, self._v

        def get_seq_length(self) -> int:
            return self.n

        def truncate(self, n: int) -> None:
            self.n = max(0, min(self.n, n))

        def keep(self, index: Tensor) -> None:
            where = index.to(self._k.device)
            m = int(where.numel())
            self._k[..., :m, :] = self._k.index_select(-2, where)
            self._v[..., :m, :] = self._v.index_select(-2, where)
            self.n = m

        def reset(self) -> None:
            self.n = 0

    return FixedSlotLayer


@attrs.frozen
class StaticShape:
    """Fixed buffers for a static ``StageCache``: ``capacity`` slots of ``heads`` x ``head_dim``
    keys and values per layer; ``limit``: the most slots it may grow to (the model's context)."""

    capacity: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    limit: int | None = None


class StageCache:
    """Token ids, keys and values, and per-slot tracks of one stage (module docstring).

    length:  slots of the linear context (positions ``0 .. length-1``)
    tree:    the token tree cached after them (``TokenTree``), its node tokens and the rows the
             stage returned for it; ``None`` when no tree is cached
    """

    def __init__(self, num_layers: int, static: StaticShape | None = None) -> None:
        from transformers.cache_utils import Cache  # lazy: transformers

        self.static = static
        layer = slot_layer_class() if static is None else fixed_slot_layer_class()
        self.layers = [layer() for _ in range(num_layers)]
        self.capacity = 0
        if static is not None:
            self._allocate(static.capacity)
        self.kv: Any = Cache(layers=self.layers)
        self._ids = torch.empty(INITIAL_SLOTS, dtype=torch.long)
        self.length = 0
        self.tree: TokenTree | None = None
        self.tree_tokens: list[int] = []
        self.tree_rows: Tensor | None = None
        self._tracks: dict[str, Tensor] = {}

    # --- static buffers (graph mode) ----------------------------------------------------------

    def _allocate(self, capacity: int) -> None:
        static = self.static
        assert static is not None
        shape = (1, static.heads, capacity, static.head_dim)
        old = [(layer._k, layer._v, layer.n) for layer in self.layers] if self.capacity else None
        for i, layer in enumerate(self.layers):
            layer.allocate(shape, static.dtype, static.device)
            if old is not None:
                k, v, n = old[i]
                layer._k[..., : k.shape[-2], :] = k
                layer._v[..., : v.shape[-2], :] = v
                layer.n = n
        self.capacity = capacity

    def reserve(self, slots: int) -> None:
        """Static buffers with room for ``slots`` slots (new buffers, filled part copied, when
        they must grow: graphs captured over the old ones must be captured again)."""
        if self.static is None or slots <= self.capacity:
            return
        limit = self.static.limit
        if limit is not None and slots > limit:
            raise ValueError(f"a static cache of at most {limit} slots cannot hold {slots}")
        grown = max(slots, 2 * self.capacity)
        self._allocate(grown if limit is None else min(grown, max(limit, slots)))

    def write_at(self, slots: Tensor) -> None:
        """The slots (``Long[Tensor, "fed"]``, on the cache's device) the next forward writes."""
        for layer in self.layers:
            layer.at = slots

    def filled(self, n: int) -> None:
        """After a static forward: every layer holds slots ``0 .. n-1``."""
        for layer in self.layers:
            layer.n = n

    # --- what is cached -------------------------------------------------------------------------

    @property
    def slots(self) -> int:
        """Filled slots: the linear context, then the nodes of a cached tree."""
        return self.length + (len(self.tree_tokens) if self.tree is not None else 0)

    @property
    def ids(self) -> Tensor:
        """``Long[Tensor, "length"]`` (host): the tokens of the linear context."""
        return self._ids[: self.length]

    def prefix(self, context: Tensor) -> int:
        """How many leading tokens of ``context`` (``Long[Tensor, "L"]``) the linear slots hold."""
        m = min(self.length, int(context.numel()))
        if m == 0:
            return 0
        differ = torch.ne(self._ids[:m], context[:m].cpu()).nonzero()
        return m if differ.numel() == 0 else int(differ[0, 0])

    def tree_path(self, context: Tensor, limit: int) -> list[int]:
        """The nodes of the cached tree that ``context[length:limit]`` follows from its root
        (``[]`` when no tree is cached or the linear slots are not a prefix of ``context``)."""
        if self.tree is None or self.prefix(context) < self.length:
            return []
        return self.tree.follow(self.tree_tokens, context[self.length : limit].tolist())

    # --- moving the fill position ---------------------------------------------------------------

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` linear slots (and drop any tree)."""
        n = min(n, self.length)
        for layer in self.layers:
            layer.truncate(n)
        self.length = n
        self.drop_tree()

    def drop_tree(self) -> None:
        if self.tree is not None:
            for layer in self.layers:
                layer.truncate(self.length)
        self.tree, self.tree_tokens, self.tree_rows = None, [], None

    def reset(self) -> None:
        self.truncate(0)

    def settle(self, context: Tensor, limit: int) -> None:
        """Compact a cached tree: the path ``context`` follows (up to ``limit``, exclusive)
        becomes linear slots after ``length``; every other node is dropped."""
        if self.tree is None:
            return
        path = self.tree_path(context, limit)
        if not path:
            self.drop_tree()
            return
        base = self.length
        index = torch.cat([torch.arange(base), base + torch.tensor(path)])
        tokens = torch.tensor([self.tree_tokens[node] for node in path])
        self.tree, self.tree_tokens, self.tree_rows = None, [], None
        self._keep(index)
        self.write_ids(base, tokens)

    def reuse(self, context: Tensor, limit: int) -> int:
        """Prepare for a forward after ``context``: settle any cached tree on the path it
        follows, keep the longest cached prefix of it (at most ``limit`` slots), and return that
        length -- the slot the forward writes from."""
        self.settle(context, limit)
        self.truncate(min(self.prefix(context), limit))
        return self.length

    def _keep(self, index: Tensor) -> None:
        for layer in self.layers:
            layer.keep(index)
        for name, buf in self._tracks.items():
            m = int(index.numel())
            where = index.to(buf.device)
            buf[:m] = buf.index_select(0, where)
            self._tracks[name] = buf
        self.length = int(index.numel())

    # --- writing --------------------------------------------------------------------------------

    def write_ids(self, start: int, tokens: Tensor) -> None:
        """Record linear slots ``start ..`` as holding ``tokens`` (after the forward wrote their
        keys and values)."""
        end = start + int(tokens.numel())
        self._ids = _grow(self._ids, start, end, 0)
        self._ids[start:end] = tokens.cpu()
        self.length = end

    def set_tree(self, tree: TokenTree, tokens: list[int], rows: Tensor) -> None:
        self.tree, self.tree_tokens, self.tree_rows = tree, tokens, rows

    def write_track(self, name: str, start: int, values: Tensor) -> None:
        """Per-slot values ``Float[Tensor, "m ..."]`` for slots ``start .. start+m-1``."""
        end = start + int(values.shape[0])
        buf = self._tracks.get(name)
        if buf is None or buf.shape[1:] != values.shape[1:] or buf.dtype != values.dtype \
                or buf.device != values.device:
            buf = values.new_empty((max(INITIAL_SLOTS, end), *values.shape[1:]))
            filled = 0
        else:
            filled = start
        buf = _grow(buf, filled, end, 0)
        buf[start:end] = values
        self._tracks[name] = buf

    def track(self, name: str, index: Tensor | slice) -> Tensor:
        """Slots ``index`` of track ``name`` (an index tensor or a slice of slots)."""
        buf = self._tracks[name]
        return buf[index] if isinstance(index, slice) else buf.index_select(0, index.to(buf.device))

    def has_track(self, name: str) -> bool:
        return name in self._tracks

    def drop_tracks(self) -> None:
        self._tracks.clear()

    def kv_state(self) -> list[tuple[Tensor, Tensor]]:
        """(keys, values) per layer for the linear slots, ``Float[Tensor, "heads slots d"]``."""
        return [(layer.keys[0, :, : self.length], layer.values[0, :, : self.length])
                for layer in self.layers if layer.is_initialized]
