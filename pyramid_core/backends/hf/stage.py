"""``HFStage``: a Hugging Face causal LM as a pipeline ``Stage``, with one reusable KV cache.

Every ``score`` call is handed the full context (SPEC: roll back every stage's cache to the
accepted prefix). The stage remembers which token ids its cache holds, keeps the longest prefix
it shares with the new context -- but never the position whose logits are asked for -- and feeds
the rest in one forward:

    cached:  c_0 .. c_{m-1}
    asked:   x_0 .. x_{L-1} | b_0 .. b_{n-1}        rows at positions L-1 .. L+n-1
    keep  =  min(common_prefix(cached, asked), L - 1)
    feed  =  asked[keep:]   at positions keep .. L+n-1

Only the first ``vocab_size`` logit columns are returned: models whose embedding matrix is padded
beyond the tokenizer's length never put mass on the padding ids.

Token trees (SPEC "Tree drafting") are scored in one forward over the flattened nodes, with a 4-D
additive attention mask -- each node attends to the whole context, its ancestors and itself --
and position ids = context length + depth. The nodes then sit in the cache after the context, in
node order, and are remembered apart from the linear ``cached_tokens``:

    cache:   x_0 .. x_{L-1} | node_0 .. node_{n-1}      (node i at position L + depth(i))

The next call settles the tree before anything else: the longest root-to-node path that the new
context continues (excluding its last token, whose logits are asked for) is gathered to
consecutive positions L, L+1, ... and every other node is dropped, so tree entries are never
reused at a wrong position. A tree that extends the previous one over the same context (the tree
proposer asking depth by depth) feeds only the new nodes. Needs the eager or sdpa attention of a
model without sliding-window layers.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pyramid_core.backends.hf.hidden import FeatureBuffer
from pyramid_core.backends.hf.layers import truncate_layers
from pyramid_core.backends.hf.loading import load_model, load_tokenizer
from pyramid_core.backends.hf.student import is_student_dir, student_base
from pyramid_core.types import Block

__all__ = ["HFStage"]

def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    m = min(len(a), len(b))
    if a[:m] == b[:m]:  # the usual case: one C-level comparison
        return m
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def _tree_depths(parents: list[int]) -> list[int]:
    """Depth of every node of a flattened tree (0 for children of the context)."""
    depths: list[int] = []
    for parent in parents:
        depths.append(depths[parent] + 1 if parent >= 0 else 0)
    return depths


def _tree_mask(parents: list[int], first: int, length: int, linear_from: int, dtype: torch.dtype) -> Tensor:
    """Additive attention mask ``Float[Tensor, "1 1 q kv"]`` for one forward that feeds context
    positions ``linear_from .. length-1`` (causal) and then tree nodes ``first .. n-1``. Keys: the
    context's positions 0 .. length-1, then one slot per node 0 .. n-1; a node sees the whole
    context, its ancestors and itself."""
    n, linear = len(parents), length - linear_from
    allowed = torch.zeros(linear + n - first, length + n, dtype=torch.bool)
    allowed[:linear] = torch.arange(length + n).unsqueeze(0) <= torch.arange(linear_from, length).unsqueeze(1)
    allowed[linear:, :length] = True
    lineage: list[list[int]] = []  # ancestors-or-self of each node, as key slots
    for node, parent in enumerate(parents):
        lineage.append((lineage[parent] if parent >= 0 else []) + [length + node])
    for row, node in enumerate(range(first, n), start=linear):
        allowed[row, lineage[node]] = True
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


class HFStage:
    """A ``Stage`` around a Hugging Face causal LM (``AutoModelForCausalLM`` instance).

    ``tokenizer`` (optional) is compared across stages before decoding
    (``pyramid_core.build.check_same_tokenizer``); ``vocab_size`` defaults to ``len(tokenizer)``
    when a tokenizer is given, else ``config.vocab_size``. ``num_layers=k`` keeps only the first
    k decoder layers, sharing the weights of ``model`` (see ``truncate_layers``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        name: str | None = None,
        vocab_size: int | None = None,
        num_layers: int | None = None,
        compile: bool | str = False,
    ) -> None:
        total = int(model.config.num_hidden_layers)
        self.source = model  # kept alive: a truncated view shares its weights
        if num_layers is not None and num_layers != total:
            model = truncate_layers(model, num_layers)
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.num_layers = int(model.config.num_hidden_layers)
        # where inputs go (the embedding's device); move the model before wrapping it, not after
        self.device: torch.device = model.get_input_embeddings().weight.device
        width = self._logit_width(model)
        if vocab_size is None:
            vocab_size = len(tokenizer) if tokenizer is not None else int(model.config.vocab_size)
        if not 1 <= vocab_size <= width:
            raise ValueError(
                f"stage {name or type(model).__name__}: vocab_size {vocab_size} does not fit the model's "
                f"{width} logit columns (tokenizer longer than the embedding matrix?)"
            )
        self.vocab_size = int(vocab_size)
        if name is None:
            base = Path(str(getattr(model.config, "name_or_path", "") or type(model).__name__)).name
            name = base if self.num_layers == total else f"{base}[:{self.num_layers}]"
        self.name = name
        # the longest context its position embeddings cover (HasContextLength); GPT-2 configs
        # map max_position_embeddings to n_positions
        limit = getattr(model.config, "max_position_embeddings", None)
        self._context_length: int | None = int(limit) if isinstance(limit, int) and limit > 0 else None
        # call conventions of this transformers version, looked up once (not per token)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        # what score() runs: the model itself, or its fast view (compile=True, hf.fast); ``model``
        # stays the plain module (what HF generate runs)
        self.compiled = self._wants_compile(compile)
        self.runner: Any = model
        self._new_cache: Any = lambda: None  # None: the model makes its own cache
        if self.compiled:
            self._compile()
        self._cache: Any = self._new_cache()
        self._ids: list[int] = []
        # a token tree cached after ``_ids`` (tokens, parents), and the rows its score returned
        self._tree: tuple[list[int], list[int]] | None = None
        self._tree_rows: Tensor | None = None
        # hidden states of chosen layers for the cached positions (``enable_features``, hf.features)
        self.feature_size = int(model.config.hidden_size)
        self._features = FeatureBuffer(self.num_layers, self.feature_size, self.name)

    def enable_features(self, layers: tuple[int, ...]) -> None:
        """Keep the hidden states of ``layers`` (``hf.features`` numbering; ``()``: none) for
        every position the forwards feed from now on; a change forgets the cache."""
        if tuple(layers) != self._features.layers:
            self._features.set_layers(tuple(layers))
            self.reset()

    @property
    def feature_layers_kept(self) -> tuple[int, ...]:
        return self._features.layers

    def features(self, context: Tensor, start: int = 0, layers: tuple[int, ...] | None = None) -> Tensor:
        """``Float[Tensor, "m-start width"]``: features of positions ``start .. m-1`` of
        ``context``, m = the longest prefix of ``context`` whose tokens this stage has consumed
        (cached positions, then the path of a cached token tree that ``context`` follows)."""
        buf = self._features
        if not buf.enabled:
            raise ValueError(f"stage {self.name!r}: features are not enabled (enable_features(layers) first)")
        ids: list[int] = context.tolist()
        linear = min(_common_prefix(self._ids, ids), buf.n)
        nodes: list[int] = []
        if self._tree is not None and linear == len(self._ids) and buf.tree is not None:
            tokens, parents = self._tree
            children: dict[int, dict[int, int]] = {}
            for node in range(len(tokens)):
                children.setdefault(parents[node], {}).setdefault(tokens[node], node)
            node = -1
            for token in ids[linear:]:
                node = children.get(node, {}).get(token, -1)
                if node < 0:
                    break
                nodes.append(node)
        return buf.gather(linear, nodes, start, buf.layers if layers is None else tuple(layers))

    def _wants_compile(self, compile: bool | str) -> bool:
        """``True`` / ``False``, or ``"auto"``: the fast mode wherever it is supported (a float32
        stage on a CPU with oneDNN)."""
        if isinstance(compile, bool):
            return compile
        if compile != "auto":
            raise ValueError(f"stage {self.name!r}: compile must be true, false or auto, got {compile!r}")
        from pyramid_core.backends.hf.fast import packing_available

        dtype = next(self.model.parameters()).dtype
        return self.device.type == "cpu" and dtype == torch.float32 and packing_available()

    def _compile(self) -> None:
        """The fast execution mode (``compile=True``): on CPU, oneDNN pre-packed linears and a
        buffer KV cache (``hf.fast``)."""
        from pyramid_core.backends.hf.fast import buffer_cache, packed_view, packing_available

        if self.device.type != "cpu":
            raise ValueError(f"stage {self.name!r}: compile=true is implemented for CPU stages (oneDNN pre-packed "
                             f"weights); this stage is on {self.device} -- use compile=false there")
        if not packing_available():
            raise ValueError(f"stage {self.name!r}: compile=true needs a torch build with oneDNN (mkldnn), "
                             "which this one lacks; use compile=false")
        dtype = next(self.model.parameters()).dtype
        if dtype != torch.float32:
            raise ValueError(f"stage {self.name!r}: compile=true on CPU runs float32 weights, got {dtype}")
        self.runner = packed_view(self.model)
        self._new_cache = lambda: buffer_cache(self.num_layers)

    @staticmethod
    def _logit_width(model: Any) -> int:
        get_out = getattr(model, "get_output_embeddings", None)
        head = get_out() if callable(get_out) else None
        width = getattr(head, "logit_width", None)  # a sub-vocabulary head scatters into the full width
        if isinstance(width, int):
            return width
        weight = getattr(head, "weight", None)
        return int(weight.shape[0]) if isinstance(weight, Tensor) else int(model.config.vocab_size)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        num_layers: int | None = None,
        name: str | None = None,
        vocab_size: int | None = None,
        compile: bool | str = False,
    ) -> HFStage:
        """Load a local model directory (and its tokenizer, if it has one). Stages loaded from
        the same (path, device, dtype) share one model in memory, e.g. a layer-truncated draft
        and its target."""
        path = Path(path).expanduser()
        model = load_model(path, device=device, dtype=dtype)
        tokenizer_dir = student_base(path) if is_student_dir(path) else path
        if name is None and is_student_dir(path):
            name = path.name
        return cls(model, load_tokenizer(tokenizer_dir), name=name, vocab_size=vocab_size, num_layers=num_layers,
                   compile=compile)

    @property
    def context_length(self) -> int | None:
        """``max_position_embeddings`` of the model (``None`` if its config has none): the
        pipeline refuses a prompt + max_new_tokens longer than this."""
        return self._context_length

    @property
    def cached_tokens(self) -> tuple[int, ...]:
        """The token ids whose keys and values the cache holds."""
        return tuple(self._ids)

    def kv_state(self) -> list[tuple[Tensor, Tensor]]:
        """(keys, values) per layer, each ``Float[Tensor, "heads seq head_dim"]`` (for tests)."""
        cache = self._cache
        if cache is None:
            return []
        if hasattr(cache, "layers"):
            return [(layer.keys[0], layer.values[0]) for layer in cache.layers]
        return [(k[0], v[0]) for k, v in zip(cache.key_cache, cache.value_cache, strict=True)]

    @property
    def cached_tree(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(tokens, parents) of the token tree cached after ``cached_tokens``, if any."""
        return None if self._tree is None else (tuple(self._tree[0]), tuple(self._tree[1]))

    def reset(self) -> None:
        if self.compiled and self._cache is not None:
            self._cache.reset()  # keeps the buffers for the next generation
        else:
            self._cache = self._new_cache()
        self._ids = []
        self._tree = None
        self._tree_rows = None
        self._features.reset()

    def _rollback(self, keep: int) -> None:
        """Crop the cache to its first ``keep`` positions."""
        have = len(self._ids)
        if keep >= have:
            return
        if keep == 0 or not all(getattr(layer, "is_croppable", True) for layer in getattr(self._cache, "layers", ())):
            self.reset()
        else:
            self._cache.crop(keep - have)  # negative = number of positions to drop
            del self._ids[keep:]
            self._features.crop(keep)

    def _gather(self, index: list[int]) -> bool:
        """Keep only the cache positions ``index``, in this order, in every layer (False if
        this cache cannot be gathered; the caller then resets it)."""
        layers = getattr(self._cache, "layers", None)
        kinds = {type(layer).__name__ for layer in layers or ()}
        if layers is None or not kinds <= {"DynamicLayer", "BufferLayer"}:
            return False
        where = torch.tensor(index, device=self.device)
        for layer in layers:
            if type(layer).__name__ == "BufferLayer":
                layer.keep(where)
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys.index_select(-2, where)
                layer.values = layer.values.index_select(-2, where)
        return True

    def _settle_tree(self, ids: list[int], limit: int) -> None:
        """Compact a cached tree: keep the longest root-to-node path that ``ids`` continues
        (up to position ``limit``, exclusive), gathered right after ``_ids``; drop the rest."""
        assert self._tree is not None
        tokens, parents = self._tree
        base = len(self._ids)
        path: list[int] = []
        if ids[:base] == self._ids:
            children: dict[int, dict[int, int]] = {}
            for node in range(len(tokens)):  # first child per token (duplicates share their KV)
                children.setdefault(parents[node], {}).setdefault(tokens[node], node)
            node = -1
            for token in ids[base:limit]:
                node = children.get(node, {}).get(token, -1)
                if node < 0:
                    break
                path.append(node)
        self._tree = self._tree_rows = None
        if self._gather(list(range(base)) + [base + node for node in path]):
            self._ids += [tokens[node] for node in path]
            self._features.settle(base, path)
        else:
            self.reset()

    def _check_tree_support(self) -> None:
        config = self.model.config
        attn = getattr(config, "_attn_implementation", None) or "eager"
        sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
        if attn not in ("eager", "sdpa") or sliding or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            raise ValueError(
                f"stage {self.name!r}: token trees need a custom 4-D attention mask, supported here for "
                f"attn_implementation 'eager' or 'sdpa' without sliding-window layers (got {attn!r}"
                f"{', sliding window' if sliding else ''})"
            )

    def _score_tree(self, ids: list[int], block: Block) -> Tensor:
        """Rows for a token tree after context ``ids``: one forward over the nodes not cached."""
        assert block.parents is not None
        self._check_tree_support()
        tokens: list[int] = block.tokens.tolist()
        parents: list[int] = block.parents.tolist()
        n, length = len(tokens), len(ids)
        cached = self._tree
        if cached is not None and ids == self._ids and tokens[: len(cached[0])] == cached[0] \
                and parents[: len(cached[1])] == cached[1]:
            first, linear_from = len(cached[0]), length  # the same tree, grown: feed the new nodes
            if first == n:
                assert self._tree_rows is not None
                return self._tree_rows
        else:
            if cached is not None:
                self._settle_tree(ids, length - 1)
            self._rollback(min(_common_prefix(self._ids, ids), length - 1))
            first, linear_from = 0, len(self._ids)
        device = self.device
        depths = _tree_depths(parents)
        feed = torch.tensor([ids[linear_from:] + tokens[first:]], device=device)
        positions = torch.tensor([list(range(linear_from, length)) + [length + d for d in depths[first:]]], device=device)
        dtype = next(self.model.parameters()).dtype
        mask = _tree_mask(parents, first, length, linear_from, dtype).to(device)
        rows = n - first + (1 if first == 0 else 0)  # row 0 is recomputed unless it is cached
        kwargs: dict[str, Any] = {self._cache_kw: self._cache}
        if self._keep_kw is not None:
            kwargs[self._keep_kw] = rows
        if self._features.enabled:
            kwargs["output_hidden_states"] = True
        try:
            out = self.runner(input_ids=feed, position_ids=positions, attention_mask=mask, use_cache=True, **kwargs)
        except BaseException:
            self.reset()
            raise
        if self._features.enabled:
            linear = length - linear_from
            self._features.write(linear_from, out.hidden_states, linear)
            self._features.write_tree(first, out.hidden_states, linear, n - first)
        if self._cache is None:
            cache = out.get("cache")
            self._cache = cache if cache is not None else out.get("past_key_values")
        logits: Tensor = out.logits[0, -rows:, : self.vocab_size]
        if first:
            assert self._tree_rows is not None
            logits = torch.cat([self._tree_rows, logits])
        self._ids = ids
        self._tree, self._tree_rows = (tokens, parents), logits
        return logits

    @torch.inference_mode()
    def score(self, context: Tensor, block: Block | None = None) -> Tensor:
        """Logits ``Float[Tensor, "n+1 vocab"]``: row 0 after ``context``, row i+1 after
        ``context + block.tokens[:i+1]`` (one forward over the positions not in the cache); for a
        token tree, row i+1 after the context and the root-to-node-i path."""
        n = 0 if block is None else len(block)
        if n and block is not None and block.parents is not None:
            return self._score_tree(context.tolist(), block)
        if self._tree is not None:  # a tree from the previous call: keep only the path we follow
            asked = context.tolist()
            self._settle_tree(asked + (block.tokens.tolist() if n and block is not None else []), len(asked) - 1)
        if n:
            assert block is not None
            full = torch.cat([context, block.tokens.to(context.device)])
        else:
            full = context
        ids: list[int] = full.tolist()
        length = len(ids) - n
        if length < 1:
            raise ValueError(f"stage {self.name!r}: the context is empty (give at least one token)")
        keep = min(_common_prefix(self._ids, ids), length - 1)
        self._rollback(keep)
        keep = len(self._ids)
        device = self.device
        feed = full[keep:].to(device).unsqueeze(0)
        positions = torch.arange(keep, len(ids), device=device).unsqueeze(0)
        kwargs: dict[str, Any] = {self._cache_kw: self._cache}
        if self._keep_kw is not None:
            kwargs[self._keep_kw] = n + 1
        if self._features.enabled:
            kwargs["output_hidden_states"] = True
        try:
            out = self.runner(input_ids=feed, position_ids=positions, use_cache=True, **kwargs)
        except BaseException:
            self.reset()  # the cache may hold part of this forward
            raise
        if self._features.enabled:
            self._features.write(keep, out.hidden_states, feed.shape[1])
        if self._cache is None:
            cache = out.get("cache")
            self._cache = cache if cache is not None else out.get("past_key_values")
        self._ids = ids
        logits: Tensor = out.logits
        return logits[0, -(n + 1) :, : self.vocab_size]

    def __repr__(self) -> str:
        return (
            f"HFStage(name={self.name!r}, layers={self.num_layers}, vocab_size={self.vocab_size}, "
            f"device={self.device}, dtype={next(self.model.parameters()).dtype}, compiled={self.compiled})"
        )
