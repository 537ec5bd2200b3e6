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
  head's matrix) is a ``PackedLinear``, sibling linears that read the same input (a decoder
  layer's query, key and value projections; its gate and up projections) one fused
  ``PackedLinear`` each; everything else is shared with ``model``, which is left untouched (the
  HF baseline keeps running the original).
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


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling linear layers that read the same input in Llama-family decoder layers: the view runs
each group as one pre-packed linear (``_FusedGroup``)."""


class _FusedGroup:
    """One ``PackedLinear`` over the concatenated weights of sibling linears that a forward calls
    one after another on the same input (``FUSED``): the first member's call computes every
    output at once, each member returns its slice. One GEMV over 960 or 3,072 rows streams the
    weights faster than three or two small ones, and saves their dispatch (docs/compile.md).

    A member called on another input than the one computed for (a model that does not call the
    group together) computes the fused output for that input: always correct, only slower. The
    input is held only until every member has been served."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        weight = torch.cat([lin.weight.detach() for lin in linears])
        biases = [lin.bias for lin in linears]
        bias = None if all(b is None for b in biases) else torch.cat([
            b.detach() if b is not None else lin.weight.new_zeros(lin.out_features) for b, lin in zip(biases, linears)])
        self.linear = PackedLinear(weight, bias)
        self.sizes = [lin.out_features for lin in linears]
        self._input: Tensor | None = None
        self._outputs: tuple[Tensor, ...] = ()
        self._pending: set[int] = set()

    def output(self, index: int, x: Tensor) -> Tensor:
        if x is not self._input or index not in self._pending:
            self._outputs = tuple(self.linear(x).split(self.sizes, dim=-1))
            self._input, self._pending = x, set(range(len(self.sizes)))
        self._pending.discard(index)
        out = self._outputs[index]
        if not self._pending:
            self._input, self._outputs = None, ()
        return out


class _FusedMember(nn.Module):
    """Member ``index`` of a ``_FusedGroup``, in place of one ``nn.Linear`` (the first member
    holds the group's packed linear as its child)."""

    group: _FusedGroup

    def __init__(self, group: _FusedGroup, index: int, in_features: int) -> None:
        super().__init__()
        object.__setattr__(self, "group", group)
        self.index, self.in_features, self.out_features = index, in_features, group.sizes[index]
        if index == 0:
            self.fused = group.linear

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.group.output(self.index, x)
        return out

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, slice {self.index} of a fused oneDNN pre-packed linear"


def _fused_children(module: nn.Module) -> dict[str, nn.Module]:
    """``FUSED`` groups among ``module``'s children (plain ``nn.Linear`` layers reading inputs of
    one width, all present), as members of one ``_FusedGroup`` each."""
    out: dict[str, nn.Module] = {}
    for names in FUSED:
        linears = [module._modules.get(name) for name in names]
        if all(type(lin) is nn.Linear for lin in linears):
            group = [lin for lin in linears if isinstance(lin, nn.Linear)]
            if len({lin.in_features for lin in group}) == 1 and len({lin.weight.dtype for lin in group}) == 1:
                fused = _FusedGroup(group)
                out.update({name: _FusedMember(fused, i, group[0].in_features) for i, name in enumerate(names)})
    return out


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
        fused = _fused_children(module)
        new._modules = {name: fused[name] if name in fused else None if child is None else rebuild(child)
                        for name, child in module._modules.items()}
        if config is not None and getattr(new, "config", None) is config:
            object.__setattr__(new, "config", view_config)  # the view's own: the model's keeps its attention
        return new

    return rebuild(model)
