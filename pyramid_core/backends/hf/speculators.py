"""EAGLE-3 heads in the ``speculators`` checkpoint format: the layout vLLM's EAGLE-3 path loads
(``speculative_config={"method": "eagle3", "model": DIR}``) and in which EAGLE-3 heads are
published ([serving with vLLM](../../serving.md#eagle-3-heads-in-the-speculators-format)).

A folder holds ``config.json`` and ``model.safetensors`` (or shards with an index)::

    config.json   speculators_model_type "eagle3"; transformer_layer_config (the head's decoder
                  layers, a Llama config); draft_vocab_size; norm_before_residual;
                  eagle_aux_hidden_state_layer_ids; speculators_config (k, the verifier)
    weights       fc.weight                    [H, n*H]   the fusion of the n target layers
                  layers.0.hidden_norm.weight  [H]        norm_h of the feature
                  layers.I.*                   a Llama decoder layer; layer 0's q/k/v read 2H
                  norm.weight                  [H]        before the LM head
                  lm_head.weight, d2t, t2d     a sub-vocabulary head: draft id i is token i + d2t[i]
                  (absent: the target's embedding and LM head are shared)

The correspondence with a pyramid eagle3 head (``hf.head``) is exact, parameter for parameter:
``fc`` is pyramid's ``fuse``, ``layers.0.hidden_norm`` its ``hidden_norm``, an own LM head its
``SubVocabHead`` (``token_ids = arange + d2t``). The one renaming is of the target's layers:
vLLM's auxiliary hidden state ``a`` is the input of decoder layer ``a`` (``a - 1``'s output before
the final norm), pyramid's feature layer ``i`` is decoder layer ``i``'s output, so ``a = i + 1``;
vLLM fuses them in increasing order. Pyramid's layer ``-1`` (the final-normed state) has no
counterpart: a head reading it cannot be exported. A folder written by ``export_speculators``
also records pyramid's own description of the head (key ``pyramid``), so it comes back as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

from pyramid_core.backends.hf.files import read_json
from pyramid_core.backends.hf.head import (
    FORMAT,
    LAYER_KEYS,
    FeatureHead,
    FeatureHeadConfig,
    resolve_base,
)
from pyramid_core.backends.hf.hub import resolve_model_dir

__all__ = ["EAGLE3_TYPE", "is_speculators_dir", "export_speculators", "load_speculators_head",
           "speculators_base", "vllm_aux_layers"]

EAGLE3_TYPE = "eagle3"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
UNSUPPORTED_FLAGS = ("norm_before_fc", "fc_norm", "norm_output")
"""Variants of vLLM's EAGLE-3 layout that pyramid's head does not have."""


def is_speculators_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a ``speculators`` checkpoint (any algorithm)."""
    file = Path(path).expanduser() / CONFIG_FILE
    if not file.is_file():
        return False
    try:
        return "speculators_model_type" in json.loads(file.read_text())
    except (OSError, ValueError):
        return False


def vllm_aux_layers(num_layers: int) -> tuple[int, ...]:
    """vLLM's default EAGLE-3 auxiliary layers of a ``num_layers``-layer target (its ids)."""
    return (2, num_layers // 2, num_layers - 3)


def _aux_ids(layers: tuple[int, ...], num_layers: int) -> list[int]:
    out = []
    for i in layers:
        if not 0 <= i <= num_layers - 2:
            raise ValueError(f"the head reads target layer {i}, which vLLM does not hand an EAGLE-3 head: it gives the "
                             f"outputs of decoder layers 0..{num_layers - 2} (pyramid's numbering), never the final-normed "
                             f"state (-1); train with e.g. --layers "
                             f"{','.join(str(a - 1) for a in vllm_aux_layers(num_layers))} (vLLM's default)")
        out.append(i + 1)
    return out


def export_speculators(head: FeatureHead, out_dir: str | Path, *, verifier: str, base: str | None = None, k: int = 3,
                       dtype: torch.dtype | None = None) -> Path:
    """Write ``head`` (an eagle3 ``FeatureHead``) as a speculators checkpoint in ``out_dir``.

    verifier: the target as vLLM will be given it (a directory or a Hugging Face id), recorded in
              ``speculators_config.verifier``
    base:     pyramid's name of the base model (``smollm2``, a directory), recorded for import
    k:        the default number of speculative tokens
    dtype:    of the floating tensors (default: the head's)
    """
    from safetensors.torch import save_file

    cfg = head.cfg
    if cfg.variant != "eagle3":
        raise ValueError(f"only an EAGLE-3 head has a speculators layout vLLM loads; this head is {cfg.variant} "
                         "(train one with `pyramid distill feature --variant eagle3`)")
    if k < 1:
        raise ValueError(f"k (speculative tokens) must be >= 1, got {k}")
    num_layers = int(head.base.config.num_hidden_layers)
    aux = _aux_ids(cfg.layers, num_layers)
    order = sorted(range(len(aux)), key=aux.__getitem__)
    hidden = head.hidden
    weights: dict[str, Tensor] = {}
    for name, value in head.trainable_state().items():
        if name == "fuse.weight":  # the feature blocks in vLLM's (increasing) order
            value = torch.cat([value[:, i * hidden:(i + 1) * hidden] for i in order], dim=1)
            weights["fc.weight"] = value
        elif name == "hidden_norm.weight":
            weights["layers.0.hidden_norm.weight"] = value
        elif name.startswith("layers.") or name == "norm.weight":
            weights[name] = value
        elif name == "own_head.weight":
            weights["lm_head.weight"] = value
        elif name == "own_head.token_ids":
            ids = value.to(torch.long)
            weights["d2t"] = ids - torch.arange(ids.numel(), dtype=torch.long)
            t2d = torch.zeros(head.vocab_size, dtype=torch.bool)
            t2d[ids] = True
            weights["t2d"] = t2d
        else:
            raise ValueError(f"feature head: no speculators name for its tensor {name!r}")
    dtype = dtype or head.reference_weight.dtype
    weights = {n: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
               for n, v in weights.items()}
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    layer_config = head.config.to_dict()
    layer_config.update(num_hidden_layers=cfg.depth, tie_word_embeddings=False,
                        architectures=["LlamaForCausalLM"] if layer_config.get("model_type") == "llama"
                        else layer_config.get("architectures"), dtype=str(dtype).removeprefix("torch."))
    layer_config.pop("_attn_implementation", None)
    if isinstance(layer_config.get("layer_types"), list):
        layer_config["layer_types"] = layer_config["layer_types"][: cfg.depth]
    config = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": EAGLE3_TYPE,
        "speculators_version": "0.3.0",
        "transformer_layer_config": layer_config,
        "draft_vocab_size": cfg.sub_vocab or head.vocab_size,
        "target_hidden_size": hidden,
        "norm_before_residual": cfg.norm_before_residual,
        "eagle_aux_hidden_state_layer_ids": sorted(aux),
        "speculators_config": {
            "algorithm": EAGLE3_TYPE,
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(k),
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "verifier": {"name_or_path": verifier,
                         "architectures": list(getattr(head.base.config, "architectures", None) or [])},
        },
        "pyramid": {"format": FORMAT, "base": base or verifier,
                    "architecture": attrs.asdict(attrs.evolve(cfg, layers=tuple(sorted(cfg.layers))))},
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def speculators_base(path: str | Path) -> Path:
    """The directory of the target a speculators head was trained on: pyramid's record of it,
    else the verifier's ``name_or_path`` (a directory, or a Hugging Face id found offline)."""
    path = Path(path).expanduser().resolve()
    config = read_json(path / CONFIG_FILE)
    mine = config.get("pyramid") or {}
    if mine.get("base"):
        return resolve_base(str(mine["base"]), path)
    try:
        verifier = str(config["speculators_config"]["verifier"]["name_or_path"])
    except (KeyError, TypeError):
        raise ValueError(f"{path / CONFIG_FILE} names no verifier (speculators_config.verifier.name_or_path); "
                         "give the target's directory as base=") from None
    return resolve_model_dir(verifier)


def _read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if (path / WEIGHTS_FILE).is_file():
        return load_file(str(path / WEIGHTS_FILE))
    if (path / INDEX_FILE).is_file():
        shards = sorted(set(read_json(path / INDEX_FILE).get("weight_map", {}).values()))
        out: dict[str, Tensor] = {}
        for shard in shards:
            out.update(load_file(str(path / shard)))
        return out
    raise ValueError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE} (pyramid reads speculators weights in safetensors)")


def _pyramid_name(name: str) -> str:
    name = name.removeprefix("model.").replace("midlayer.", "layers.0.")
    return {"fc.weight": "fuse.weight", "layers.0.hidden_norm.weight": "hidden_norm.weight",
            "lm_head.weight": "own_head.weight"}.get(name, name)


def load_speculators_head(path: str | Path, base: Any) -> FeatureHead:
    """The EAGLE-3 head in the speculators folder ``path`` as a pyramid ``FeatureHead`` on the
    target ``base`` (an ``AutoModelForCausalLM``, e.g. ``load_model(speculators_base(path))``),
    in the base's dtype, eval mode. What pyramid's head cannot represent is refused, naming it."""
    path = Path(path).expanduser()
    where = path / CONFIG_FILE
    config = read_json(where)
    kind = config.get("speculators_model_type")
    if kind != EAGLE3_TYPE:
        raise ValueError(f"{where}: a speculators head of type {kind!r}; pyramid imports {EAGLE3_TYPE!r} heads")
    for flag in UNSUPPORTED_FLAGS:
        if config.get(flag):
            raise ValueError(f"{where}: {flag}=true is a variant of EAGLE-3's layout that pyramid's head does not have")
    layer = config.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise ValueError(f"{where}: no transformer_layer_config (the head's decoder layers)")
    base_config = base.config
    hidden = int(base_config.hidden_size)
    for key in ("hidden_size", "target_hidden_size"):
        value = layer.get(key) if key == "hidden_size" else config.get(key)
        if value is not None and int(value) != hidden:
            raise ValueError(f"{where}: {key}={value}, but the target's hidden size is {hidden}")
    if layer.get("model_type", base_config.model_type) != base_config.model_type:
        raise ValueError(f"{where}: the head's layers are {layer.get('model_type')!r} and its target's "
                         f"{base_config.model_type!r}; pyramid builds a head's layers as its target's")
    num_layers = int(base_config.num_hidden_layers)
    aux = sorted(int(a) for a in (config.get("eagle_aux_hidden_state_layer_ids") or vllm_aux_layers(num_layers)))
    bad = [a for a in aux if not 1 <= a <= num_layers - 1]
    if bad:
        raise ValueError(f"{where}: auxiliary layers {bad} have no pyramid feature layer: it reads the outputs of "
                         f"decoder layers 0..{num_layers - 2} (ids 1..{num_layers - 1}), not the embeddings (0) "
                         f"nor the last layer's output before its norm ({num_layers})")
    vocab = int(base.get_input_embeddings().weight.shape[0])
    raw = {_pyramid_name(n): v for n, v in _read_weights(path).items()}
    raw.pop("t2d", None)
    embed = raw.pop("embed_tokens.weight", None)
    if embed is not None and not torch.allclose(embed.float(), base.get_input_embeddings().weight.detach().float().cpu(),
                                                atol=1e-2, rtol=1e-2):
        raise ValueError(f"{path}: the head has an embedding of its own, unlike its target's; pyramid's head shares "
                         "the target's")
    d2t = raw.pop("d2t", None)
    lm = raw.get("own_head.weight")
    ids: Tensor | None = None
    if d2t is not None:
        ids = torch.arange(d2t.numel(), dtype=torch.long) + d2t.to(torch.long)
    elif lm is not None:
        if lm.shape[0] != vocab:
            raise ValueError(f"{path}: a {lm.shape[0]}-row LM head without d2t (which token each row is)")
        shared = base.get_output_embeddings().weight.detach().float().cpu()
        if torch.allclose(lm.float(), shared, atol=1e-2, rtol=1e-2):
            raw.pop("own_head.weight")
        else:
            ids = torch.arange(vocab, dtype=torch.long)
    if ids is not None:
        raw["own_head.token_ids"] = ids
    cfg = FeatureHeadConfig(layers=tuple(a - 1 for a in aux), variant="eagle3",
                            depth=int(layer.get("num_hidden_layers", 1)), sub_vocab=0 if ids is None else int(ids.numel()),
                            norm_before_residual=bool(config.get("norm_before_residual", True)))
    overrides = {key: layer[key] for key in LAYER_KEYS
                 if key in layer and layer[key] is not None and layer[key] != getattr(base_config, key, None)}
    head = FeatureHead(base, cfg, ids, layer_config=overrides)
    expected = set(head.trainable_state())
    if set(raw) != expected:
        missing, extra = sorted(expected - set(raw)), sorted(set(raw) - expected)
        raise ValueError(f"{path}: the weights do not make an EAGLE-3 head of this config: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}")
    for name, value in head.trainable_state().items():
        if raw[name].shape != value.shape:
            raise ValueError(f"{path}: {name} has shape {list(raw[name].shape)}, the config says {list(value.shape)}")
    dtype = head.reference_weight.dtype
    head.load_state_dict({n: v.to(dtype) if v.is_floating_point() else v for n, v in raw.items()}, strict=False)
    return head.eval()
