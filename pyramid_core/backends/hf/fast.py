"""The fast (``compile=true``) execution mode of model stages on CPU: oneDNN pre-packed linear
layers.

Why (figures in docs/compile.md): an eager ``F.linear`` with a few rows (M = 2..16
tokens per forward) runs a small-M GEMM that costs 1.5-3x the one-row GEMV, so a verification
forward of M tokens cost ~2x a decode step. oneDNN's linear on weights reordered once into its
blocked layout (what inductor's ``freezing`` emits for every linear) runs M = 1..8 at nearly the
cost of M = 1, and the 49152-row LM head 2-3x faster than eager even at M = 1. Doing the packing
directly, without tracing the model, costs about a second instead of minutes of compilation,
compiles nothing per shape (so no bucketing is needed on CPU), and keeps every dynamic-shape
feature of the eager stage: rollback, token trees, sub-vocabulary heads, any context length.
``torch.compile`` of the whole model on top (inductor, ``freezing=True``, dynamic shapes) was
measured slower than this and took minutes to compile (docs/compile.md).

- ``packed_view(model)``: a view of ``model`` in which every ``nn.Linear`` (and a sub-vocabulary
  head's matrix) is a ``PackedLinear``; everything else is shared with ``model``, which is left
  untouched (the HF baseline keeps running the original).
- ``ATTENTION``: scaled-dot-product attention that keeps grouped-query attention grouped when a
  mask is needed. Hugging Face's ``sdpa`` repeats every cached key and value head for each query
  group (a copy of the whole cache, per layer, per forward) whenever a forward feeds more than
  one token with a mask -- every verification forward; torch's SDPA takes ``enable_gqa`` with a
  mask on CPU, so the view uses it (registered as an attention implementation of its own, set on
  the view's copy of the config only).

Every model stage, eager or fast, keeps its keys and values in one ``StageCache``
(``backends.hf.cache``); ``backends.hf.runtime`` decides when this mode runs.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PackedLinear", "packed_view", "packing_available", "PACK_HINT"]

PACK_HINT = 16
"""Rows the oneDNN weight layout is tuned for; one packed weight serves every M (measured flat up
to M = 4 and within 1.5x up to M = 16 on SmolLM2's shapes)."""


def packing_available() -> bool:
    """Whether this torch build can pre-pack linear weights with oneDNN (x86 CPU builds can)."""
    available: bool = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
    return available and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` reordered once into oneDNN's blocked layout (CPU, inference
    only: the packed weight is an opaque tensor without gradients).

    packed: the reordered ``Float[Tensor, "out in"]``; forward: ``Float[Tensor, "... in"]`` ->
    ``Float[Tensor, "... out"]``."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_HINT)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        out: Tensor = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN pre-packed"


class _PackedSubVocab(nn.Module):
    """A sub-vocabulary head (``hf.student.SubVocabHead``) with its matrix pre-packed."""

    def __init__(self, head: Any) -> None:
        super().__init__()
        self.linear = PackedLinear(head.weight)
        self.register_buffer("token_ids", head.token_ids, persistent=False)
        self.vocab_size = self.logit_width = int(head.vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        sub = self.linear(hidden)
        out = sub.new_full((*sub.shape[:-1], self.vocab_size), torch.finfo(sub.dtype).min)
        result: Tensor = out.index_copy_(-1, self.token_ids, sub)
        return result


ATTENTION = "pyramid_sdpa_gqa"
"""The attention implementation of the fast view (module docstring)."""


def _gqa_sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
              dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
              **kwargs: Any) -> tuple[Tensor, None]:
    """Hugging Face's ``sdpa`` attention without ``repeat_kv``: grouped heads stay grouped."""
    groups = int(getattr(module, "num_key_value_groups", 1))
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    causal = query.shape[2] > 1 and attention_mask is None and causal
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _register_attention() -> bool:
    """Register ``ATTENTION`` with transformers (masks as for ``sdpa``); False if this version
    has no attention registry (the view then keeps the model's own attention)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # pragma: no cover
        return False
    AttentionInterface.register(ATTENTION, _gqa_sdpa)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return True


def packed_view(model: nn.Module) -> nn.Module:
    """A view of ``model`` whose linear layers are ``PackedLinear`` and whose ``sdpa`` attention
    keeps grouped-query heads grouped (module docstring). Modules on the way to a linear are
    shallow-copied; parameters elsewhere stay shared with ``model``, which is left untouched."""
    if not packing_available():
        raise ValueError("this torch build cannot pre-pack linear weights (oneDNN is unavailable)")
    from pyramid_core.backends.hf.student import SubVocabHead

    config: Any = getattr(model, "config", None)
    view_config = copy.deepcopy(config) if config is not None else None
    if view_config is not None and getattr(config, "_attn_implementation", None) == "sdpa" and _register_attention():
        view_config._attn_implementation = ATTENTION

    def rebuild(module: nn.Module) -> nn.Module:
        if isinstance(module, nn.Linear):
            return PackedLinear(module.weight, module.bias)
        if isinstance(module, SubVocabHead):
            return _PackedSubVocab(module)
        new = copy.copy(module)
        new._modules = {name: None if child is None else rebuild(child) for name, child in module._modules.items()}
        if config is not None and getattr(new, "config", None) is config:
            object.__setattr__(new, "config", view_config)  # the view's own: the model's keeps its attention
        return new

    return rebuild(model)
