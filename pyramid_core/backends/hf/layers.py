"""Where a Hugging Face causal LM keeps its decoder layers, and layer-truncated views of it
(an early-exit draft sharing every weight with the full model)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

__all__ = ["decoder_layers", "truncate_layers", "forward_weight_bytes", "unique_bytes"]


def decoder_layers(model: Any) -> tuple[nn.Module, str, nn.ModuleList]:
    """(module holding the decoder layers, attribute name, the layers) of a causal LM."""
    config = model.config
    n = int(config.num_hidden_layers)
    base = getattr(model, "base_model", model)
    for owner in (base, model):
        for attr in ("layers", "h", "blocks", "block"):
            layers = getattr(owner, attr, None)
            if isinstance(layers, nn.ModuleList) and len(layers) == n:
                return owner, attr, layers
    for owner in base.modules():  # e.g. OPT: model.decoder.layers
        for attr, child in owner.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                return owner, attr, child
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__} to truncate")


def truncate_layers(model: Any, num_layers: int) -> Any:
    """A view of ``model`` running only its first ``num_layers`` decoder layers (then the final
    norm and LM head): an early-exit draft that shares every weight with ``model``, which is left
    untouched. Only the modules on the path to the layer list are shallow-copied."""
    config = model.config
    total = int(config.num_hidden_layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be in 1..{total} for {type(model).__name__}, got {num_layers}")
    if num_layers == total:
        return model
    owner, attr, layers = decoder_layers(model)
    new_config = copy.deepcopy(config)
    new_config.num_hidden_layers = num_layers
    layer_types = getattr(new_config, "layer_types", None)
    if isinstance(layer_types, list):
        new_config.layer_types = layer_types[:num_layers]

    # path of submodule names from the model down to ``owner``
    path: list[str] = []
    if owner is not model:
        names = {id(m): name for name, m in model.named_modules()}
        path = names[id(owner)].split(".")

    def clone(module: nn.Module) -> nn.Module:
        new = copy.copy(module)
        new._modules = dict(module._modules)  # so replacing a child does not touch the original
        if hasattr(new, "config"):
            new.config = new_config
        return new

    root = clone(model)
    parent = root
    for name in path:
        child = clone(parent._modules[name])  # type: ignore[arg-type]
        parent._modules[name] = child
        parent = child
    parent._modules[attr] = nn.ModuleList(list(layers)[:num_layers])
    return root


def forward_weight_bytes(model: Any, num_layers: int | None = None) -> int:
    """Bytes of weights one decode forward of ``model`` reads (its first ``num_layers`` decoder
    layers; all by default): every parameter and buffer once (tied weights count once), but
    neither the layers past ``num_layers`` nor the input embedding, of which a forward reads
    only the fed rows -- unless it is tied to the LM head, which reads all of it. Divided by the
    memory bandwidth, the least time a forward can take (``pyramid profile``'s floor)."""
    _, _, layers = decoder_layers(model)
    skipped = {id(p) for layer in layers[num_layers or len(layers):] for p in layer.parameters()}
    embed = model.get_input_embeddings().weight
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if getattr(head, "weight", None) is not embed:
        skipped.add(id(embed))
    return unique_bytes(t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in skipped)


def unique_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of ``tensors``, each storage counted once (tied weights)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
