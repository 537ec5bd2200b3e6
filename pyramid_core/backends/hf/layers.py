"""Where a Hugging Face causal LM keeps its decoder layers, and layer-truncated views of it
(an early-exit draft sharing every weight with the full model)."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

__all__ = ["decoder_layers", "truncate_layers"]


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
