"""``HFStage``: a Hugging Face causal LM as a pipeline ``Stage``, over one ``StageCache``.

Every ``score`` call is handed the full context (the pipeline rolls every stage back to the
accepted prefix: [the exact chain](../../algorithms.md#the-exact-n-stage-chain)).
The stage's ``StageCache`` (``backends.hf.cache``) says how many leading tokens of it are cached;
the stage keeps those -- but never the position whose logits are asked for -- and feeds the rest
in one forward, written from that slot on:

    cached:  c_0 .. c_{m-1}
    asked:   x_0 .. x_{L-1} | b_0 .. b_{n-1}        rows at positions L-1 .. L+n-1
    keep  =  min(cached prefix of asked, L - 1)
    feed  =  asked[keep:]   at positions keep .. L+n-1

Only the first ``vocab_size`` logit columns are returned: models whose embedding matrix is padded
beyond the tokenizer's length never put mass on the padding ids.

Token trees ([tree drafting](../../algorithms.md#tree-drafting))
are scored in one forward over the flattened nodes, with a 4-D additive attention mask -- each
node attends to the whole context, its ancestors and itself -- and position ids = context length
+ depth. The nodes then sit in the cache after the context, in node order. The next call settles
the tree first (``StageCache.settle``): the path the new context follows is gathered right after
the context and every other node is dropped. A tree that extends the previous one over the same
context (the tree proposer asking depth by depth) feeds only the new nodes. Needs the eager or
sdpa attention of a model without sliding-window layers.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pyramid_core.backends.hf.cache import StageCache, StaticShape
from pyramid_core.backends.hf.choice import ModeChoice, choose_modes, fingerprint
from pyramid_core.backends.hf.fast import packed_view
from pyramid_core.backends.hf.graphs import StaticForward
from pyramid_core.backends.hf.hidden import FeatureLayers
from pyramid_core.backends.hf.hub import location_label, resolve_model_dir
from pyramid_core.backends.hf.layers import truncate_layers
from pyramid_core.backends.hf.loading import load_model, load_tokenizer
from pyramid_core.backends.hf.runtime import measured_candidates, resolve_mode
from pyramid_core.backends.hf.student import is_student_dir, student_base
from pyramid_core.devices import sync
from pyramid_core.options import ExecutionMode
from pyramid_core.tree import TokenTree
from pyramid_core.types import Block

__all__ = ["HFStage"]

STATIC_SLOTS = 1024
"""Slots a static cache (graph mode) starts with; it grows, up to the model's context, by doubling."""

PROBE_CONTEXT = 64
"""Tokens in the cache when ``compile=auto`` times a stage's modes (``backends.hf.choice``)."""

FEATURES = "features"
"""The ``StageCache`` track of the kept hidden states: ``Float[Tensor, "slots layers hidden"]``."""


def _tree_allowed(tree: TokenTree, first: int, length: int, linear_from: int) -> Tensor:
    """``Bool[Tensor, "q kv"]``: what each input of one forward sees, when it feeds context
    positions ``linear_from .. length-1`` (causal) and then tree nodes ``first .. n-1``. Keys: the
    context's positions 0 .. length-1, then one slot per node 0 .. n-1; a node sees the whole
    context, its ancestors and itself."""
    n, linear = len(tree.parents), length - linear_from
    allowed = torch.zeros(linear + n - first, length + n, dtype=torch.bool)
    allowed[:linear] = torch.arange(length + n).unsqueeze(0) <= torch.arange(linear_from, length).unsqueeze(1)
    allowed[linear:, :length] = True
    allowed[linear:, length:] = tree.ancestor_mask()[first:]
    return allowed


class HFStage:
    """A ``Stage`` around a Hugging Face causal LM (``AutoModelForCausalLM`` instance).

    ``tokenizer`` (optional) is compared across stages before decoding
    (``pyramid_core.build.check_same_tokenizer``); ``vocab_size`` defaults to ``len(tokenizer)``
    when a tokenizer is given, else ``config.vocab_size``. ``num_layers=k`` keeps only the first
    k decoder layers, sharing the weights of ``model`` (see ``truncate_layers``). ``compile`` is
    the execution mode (``ExecutionMode``; a bool or a word is parsed), resolved once here.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        name: str | None = None,
        vocab_size: int | None = None,
        num_layers: int | None = None,
        compile: ExecutionMode | bool | str = ExecutionMode.EAGER,
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
            source = str(getattr(model.config, "name_or_path", "") or "")
            base = location_label(Path(source)) if source else type(model).__name__  # an id, not a snapshot hash
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
        # hidden states of chosen layers for the cached positions (``enable_features``)
        self.feature_size = int(model.config.hidden_size)
        self._features = FeatureLayers(self.num_layers, self.name)
        # what score() runs: the model itself, or its fast view, per fed length (``compile=auto``
        # measures which); ``model`` stays the plain module (what HF generate runs)
        self.dtype: torch.dtype = next(model.parameters()).dtype
        self.mode = resolve_mode(ExecutionMode.parse(compile), self.device, self.dtype, self.name)
        self.runners: dict[ExecutionMode, Any] = {ExecutionMode.EAGER: model}
        self.choice: ModeChoice | None = None
        self._static: StaticForward | None = None
        self._compiled: tuple[StageCache, StaticForward] | None = None  # ``auto`` timing the compiled mode
        if self.mode in (ExecutionMode.GRAPHS, ExecutionMode.STATIC, ExecutionMode.COMPILED):
            self._cache, self._static = self._static_forward(self.mode)
        else:
            self._cache = StageCache(self.num_layers)
        if self.mode in (ExecutionMode.FAST, ExecutionMode.AUTO):
            self.runners[ExecutionMode.FAST] = packed_view(model)
        if self.mode is ExecutionMode.AUTO:
            candidates = measured_candidates(self.device, self.dtype)
            key = fingerprint(model, kind="hf", dtype=self.dtype, device=self.device, layers=self.num_layers)
            self.choice = choose_modes(key, self._time_mode, candidates)
            if self.choice.distinct == (ExecutionMode.COMPILED,):  # every forward over the static cache
                self._cache, self._static = self._compiled or self._static_forward(ExecutionMode.COMPILED)
            self._compiled = None
            self.runners = {m: r for m, r in self.runners.items() if m in self.choice.distinct}
            self.reset()
        self.runner: Any = self.runners.get(self.mode_for(1), model)  # static / graphs: the model itself

    def mode_for(self, m: int) -> ExecutionMode:
        """The mode of a forward feeding ``m`` tokens (``compile=auto``: the measured choice)."""
        if self.choice is not None:
            return self.choice.mode_for(m)
        return ExecutionMode.EAGER if self.mode is ExecutionMode.AUTO else self.mode

    @property
    def compiled(self) -> bool:
        """Whether one-token forwards (decoding) run in the fast mode."""
        return self.mode_for(1) is ExecutionMode.FAST

    @property
    def mode_summary(self) -> str:
        """The mode in words: ``"fast"``, ``"eager"``, or the measured choice per fed length."""
        return self.choice.summary() if self.choice is not None else self.mode.value

    def _static_forward(self, mode: ExecutionMode) -> tuple[StageCache, StaticForward]:
        """A static cache and the static-shape forwards over it, captured (``GRAPHS``), compiled
        (``COMPILED``) or neither (``STATIC``)."""
        config = self.model.config
        heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        capacity = min(STATIC_SLOTS, self._context_length or STATIC_SLOTS)
        shape = StaticShape(capacity, heads, head_dim, self.dtype, self.device, self._context_length)
        cache = StageCache(self.num_layers, static=shape)
        return cache, StaticForward(self.model, cache, self._cache_kw, capture=mode is ExecutionMode.GRAPHS,
                                    compiled=mode is ExecutionMode.COMPILED)

    @torch.inference_mode()
    def _time_mode(self, mode: ExecutionMode, m: int) -> float:
        """Seconds of one forward in ``mode`` feeding ``m`` tokens after ``PROBE_CONTEXT`` cached
        ones (the cache is left holding that context)."""
        if mode is ExecutionMode.COMPILED:
            return self._time_compiled(m)
        runner = self.runners[mode]
        cache = self._cache
        if cache.length != PROBE_CONTEXT:
            cache.reset()
            ids = torch.arange(PROBE_CONTEXT) % self.vocab_size
            self._eager(ids, torch.arange(PROBE_CONTEXT), 1, None, runner)
            cache.write_ids(0, ids)
        feed = (torch.arange(m) * 7 + 3) % self.vocab_size
        sync(self.device)
        start = time.perf_counter()
        self._eager(feed, torch.arange(PROBE_CONTEXT, PROBE_CONTEXT + m), m, None, runner)
        sync(self.device)
        seconds = time.perf_counter() - start
        cache.truncate(PROBE_CONTEXT)
        return seconds

    def _time_compiled(self, m: int) -> float:
        """``_time_mode`` for the compiled mode, over a static cache of its own (kept: the stage
        runs on it if the compiled mode is chosen)."""
        if self._compiled is None:
            self._compiled = self._static_forward(ExecutionMode.COMPILED)
        cache, forward = self._compiled
        if cache.length != PROBE_CONTEXT:
            cache.reset()
            ids = torch.arange(PROBE_CONTEXT) % self.vocab_size
            forward(ids, torch.arange(PROBE_CONTEXT), 0)
            cache.filled(PROBE_CONTEXT)
            cache.write_ids(0, ids)
        feed = (torch.arange(m) * 7 + 3) % self.vocab_size
        sync(self.device)
        start = time.perf_counter()
        forward(feed, torch.arange(PROBE_CONTEXT, PROBE_CONTEXT + m), PROBE_CONTEXT)
        sync(self.device)
        seconds = time.perf_counter() - start
        cache.filled(PROBE_CONTEXT + m)
        cache.truncate(PROBE_CONTEXT)
        return seconds

    def enable_features(self, layers: tuple[int, ...]) -> None:
        """Keep the hidden states of ``layers`` (``backends.hf.hidden`` numbering; ``()``: none)
        for every position the forwards feed from now on; a change forgets the cache."""
        if self._features.set_layers(tuple(layers)):
            if self._static is not None:
                self._static.keep_hidden_states(self._features.enabled)
            self.reset()

    @property
    def feature_layers_kept(self) -> tuple[int, ...]:
        return self._features.layers

    def features(self, context: Tensor, start: int = 0, layers: tuple[int, ...] | None = None) -> Tensor:
        """``Float[Tensor, "m-start width"]``: features of positions ``start .. m-1`` of
        ``context``, m = the longest prefix of ``context`` whose tokens this stage has consumed
        (cached positions, then the path of a cached token tree that ``context`` follows)."""
        if not self._features.enabled:
            raise ValueError(f"stage {self.name!r}: features are not enabled (enable_features(layers) first)")
        cache = self._cache
        linear = cache.prefix(context)
        slots = torch.arange(start, max(start, linear))
        if linear == cache.length and cache.tree is not None:
            path = cache.tree_path(context, int(context.numel()))[max(0, start - linear):]
            slots = torch.cat([slots, cache.length + torch.tensor(path, dtype=torch.long)])
        if not slots.numel() or not cache.has_track(FEATURES):
            return torch.empty(0, len(layers or self._features.layers) * self.feature_size, device=self.device)
        return self._features.select(cache.track(FEATURES, slots), self._features.layers if layers is None else layers)

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
        compile: ExecutionMode | bool | str = ExecutionMode.EAGER,
    ) -> HFStage:
        """Load a local model directory or a Hugging Face id (``org/name[@revision]``, resolved
        by ``hub.resolve_model_dir``), and its tokenizer if it has one. Stages loaded from the
        same (directory, device, dtype) share one model in memory, e.g. a layer-truncated draft
        and its target."""
        path = resolve_model_dir(path)
        model = load_model(path, device=device, dtype=dtype)
        tokenizer_dir = student_base(path) if is_student_dir(path) else path
        if name is None and is_student_dir(path):
            name = location_label(path)
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
        return tuple(self._cache.ids.tolist())

    def kv_state(self) -> list[tuple[Tensor, Tensor]]:
        """(keys, values) per layer, each ``Float[Tensor, "heads seq head_dim"]`` (for tests)."""
        return self._cache.kv_state() if self._cache.length else []

    @property
    def cached_tree(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(tokens, parents) of the token tree cached after ``cached_tokens``, if any."""
        tree = self._cache.tree
        return None if tree is None else (tuple(self._cache.tree_tokens), tuple(tree.parents))

    def reset(self) -> None:
        self._cache.reset()

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

    def _forward(self, feed: Tensor, positions: Tensor, rows: int, slot: int, allowed: Tensor | None = None) -> Tensor:
        """One forward feeding ``feed`` (``Long[Tensor, "m"]``) at ``positions``, written into
        cache slots ``slot ..``, each input seeing the slots ``allowed`` marks
        (``Bool[Tensor, "m keys"]``; ``None``: causal); the logits of its last ``rows`` inputs."""
        try:
            if self._static is not None:
                logits, hidden = self._static(feed, positions, slot, allowed)
                self._cache.filled(slot + int(feed.numel()))
            else:
                logits, hidden = self._eager(feed, positions, rows, allowed)
        except BaseException:
            self.reset()  # the cache may hold part of this forward
            raise
        if hidden is not None:
            self._cache.write_track(FEATURES, slot, self._features.stack(hidden))
        return logits[-rows:, : self.vocab_size]

    def _eager(self, feed: Tensor, positions: Tensor, rows: int, allowed: Tensor | None, runner: Any = None
               ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        kwargs: dict[str, Any] = {self._cache_kw: self._cache.kv}
        if self._keep_kw is not None:
            kwargs[self._keep_kw] = rows
        if self._features.enabled:
            kwargs["output_hidden_states"] = True
        if allowed is not None:
            mask = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
            kwargs["attention_mask"] = mask[None, None].to(self.device)
        if runner is None:
            runner = self.runners.get(self.mode_for(int(feed.numel())), self.model)
        out = runner(input_ids=feed.to(self.device).unsqueeze(0), position_ids=positions.to(self.device).unsqueeze(0),
                     use_cache=True, **kwargs)
        return out.logits[0], out.hidden_states if self._features.enabled else None

    def _score_tree(self, context: Tensor, block: Block) -> Tensor:
        """Rows for a token tree after ``context``: one forward over the nodes not cached."""
        self._check_tree_support()
        tree = block.tree
        assert tree is not None
        tokens: list[int] = block.tokens.tolist()
        n, length, cache = len(tokens), int(context.numel()), self._cache
        cached = cache.tree
        grown = cached is not None and cache.length == length and cache.prefix(context) == length \
            and tokens[: len(cache.tree_tokens)] == cache.tree_tokens \
            and tree.parents[: len(cached.parents)] == cached.parents
        if grown:
            first, linear_from = len(cache.tree_tokens), length  # the same tree, grown: feed the new nodes
            if first == n:
                assert cache.tree_rows is not None
                return cache.tree_rows
        else:
            first, linear_from = 0, cache.reuse(context, length - 1)
        depths = torch.tensor(tree.depths[first:], dtype=torch.long)
        feed = torch.cat([context[linear_from:].cpu(), block.tokens[first:].cpu()])
        positions = torch.cat([torch.arange(linear_from, length), length + depths])
        allowed = _tree_allowed(tree, first, length, linear_from)
        rows = n - first + (1 if first == 0 else 0)  # row 0 is recomputed unless it is cached
        slot = linear_from if first == 0 else length + first
        logits = self._forward(feed, positions, rows, slot, allowed)
        if first:
            assert cache.tree_rows is not None
            logits = torch.cat([cache.tree_rows, logits])
        else:
            cache.write_ids(linear_from, context[linear_from:])
        cache.set_tree(tree, tokens, logits)
        return logits

    @torch.inference_mode()
    def score(self, context: Tensor, block: Block | None = None) -> Tensor:
        """Logits ``Float[Tensor, "n+1 vocab"]``: row 0 after ``context``, row i+1 after
        ``context + block.tokens[:i+1]`` (one forward over the positions not in the cache); for a
        token tree, row i+1 after the context and the root-to-node-i path."""
        length = int(context.numel())
        if length < 1:
            raise ValueError(f"stage {self.name!r}: the context is empty (give at least one token)")
        n = 0 if block is None else len(block)
        if n and block is not None and block.tree is not None:
            return self._score_tree(context, block)
        full = torch.cat([context.cpu(), block.tokens.cpu()]) if n and block is not None else context.cpu()
        keep = self._cache.reuse(full, length - 1)
        feed = full[keep:]
        logits = self._forward(feed, torch.arange(keep, length + n), n + 1, keep)
        self._cache.write_ids(keep, feed)
        return logits

    def __repr__(self) -> str:
        return (
            f"HFStage(name={self.name!r}, layers={self.num_layers}, vocab_size={self.vocab_size}, "
            f"device={self.device}, dtype={self.dtype}, mode={self.mode_summary})"
        )
