"""Distilled stages: small causal LMs built from a target's own weights.

A student keeps a chosen subset of the target's decoder layers (e.g. ``[0, 1]`` or
``[0..5, 28, 29]``), the target's final norm, and either the target's tied embedding as its
output head or a **sub-vocabulary head**: a ``K x hidden`` matrix over the K most frequent
tokens of the corpus. The sub-vocabulary head returns full-width logits with every other token
at the dtype's most negative value, so the stage's distribution is exactly zero there -- the
rejection rule handles that like any other zero (it just never proposes those tokens). With
vocab 49152 x hidden 576 the full head is ~28M parameters, more than a two-layer student's
layers, so ``K = 8192`` makes such a draft several times cheaper.

The input embedding is the target's and stays frozen, so a shipped student holds only what was
trained (layers, norm, sub-vocabulary head) and loads the embedding from the target at load time:
``stage.json`` names the base (``"smollm2"`` or a directory) next to ``model.safetensors``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pyramid_core.backends.hf.files import read_json, sha256_file
from pyramid_core.backends.hf.layers import decoder_layers
from pyramid_core.backends.hf.smollm2 import smollm2_dir, smollm2_ready

__all__ = ["SubVocabHead", "build_student", "trainable_state", "save_student", "is_student_dir", "student_base",
           "weights_record", "STAGE_FILE", "WEIGHTS_FILE"]

STAGE_FILE = "stage.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "pyramid-distilled-stage/1"


class SubVocabHead(nn.Module):
    """Logits over a sub-vocabulary, scattered into the full vocabulary.

    weight:    Float[Tensor, "k hidden"]
    token_ids: Int64[Tensor, "k"]        full-vocabulary id of each row
    forward:   Float[Tensor, "... hidden"] -> Float[Tensor, "... vocab"] (finfo.min off the sub-vocabulary)
    """

    def __init__(self, weight: Tensor, token_ids: Tensor, vocab_size: int) -> None:
        super().__init__()
        if weight.shape[0] != token_ids.numel():
            raise ValueError(f"sub-vocabulary head: {weight.shape[0]} rows for {token_ids.numel()} token ids")
        if token_ids.numel() and not 0 <= int(token_ids.min()) <= int(token_ids.max()) < vocab_size:
            raise ValueError(f"sub-vocabulary token ids must lie in 0..{vocab_size - 1}")
        self.weight = nn.Parameter(weight.detach().clone())
        self.register_buffer("token_ids", token_ids.to(torch.long).clone())
        self.vocab_size = int(vocab_size)
        self.logit_width = int(vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        sub = nn.functional.linear(hidden, self.weight)
        out = sub.new_full((*sub.shape[:-1], self.vocab_size), torch.finfo(sub.dtype).min)
        return out.index_copy_(-1, self.token_ids, sub)  # type: ignore[arg-type]


def _layers(model: Any) -> nn.ModuleList:
    return decoder_layers(model)[2]


def build_student(target: Any, layers: Sequence[int], sub_vocab: Tensor | None = None) -> Any:
    """A student of ``target`` (an ``AutoModelForCausalLM``): decoder layers ``layers`` of the
    target (copied), its final norm (copied), its input embedding (shared, frozen), and either
    the target's full head (tied, or copied when the target's is untied) or a ``SubVocabHead``
    over the token ids ``sub_vocab`` (rows initialised from the target's output embedding)."""
    from transformers import AutoModelForCausalLM

    total = int(target.config.num_hidden_layers)
    layers = [int(i) for i in layers]
    if not layers or any(not 0 <= i < total for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"student layers must be distinct indices in 0..{total - 1}, got {layers}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    if sub_vocab is not None:
        config.tie_word_embeddings = False
    auto: Any = AutoModelForCausalLM
    student = auto.from_config(config, dtype=target.dtype)
    embed = target.get_input_embeddings()
    student.set_input_embeddings(embed)  # shared with the target; never trained
    embed.weight.requires_grad_(False)
    for new, old in zip(_layers(student), layers, strict=True):
        new.load_state_dict(_layers(target)[old].state_dict())
    student.model.norm.load_state_dict(target.model.norm.state_dict())
    head = target.get_output_embeddings()  # the embedding itself when tied
    if sub_vocab is None and config.tie_word_embeddings:
        student.tie_weights()
    elif sub_vocab is None:  # an untied target: copy its head, or the student's would stay random
        student.lm_head.load_state_dict(head.state_dict())
    else:
        ids = sub_vocab.to(torch.long)
        student.lm_head = SubVocabHead(head.weight.detach()[ids], ids, embed.weight.shape[0])
    student.config.pyramid_layers = layers
    return student.eval()


def trainable_state(student: Any) -> dict[str, Tensor]:
    """What a student trains and ships: everything but the (shared, frozen) input embedding."""
    embed = student.get_input_embeddings().weight
    state: dict[str, Tensor] = {}
    for name, tensor in student.state_dict().items():
        if tensor is embed or tensor.data_ptr() == embed.data_ptr():
            continue
        state[name] = tensor
    return state


def is_student_dir(path: str | Path) -> bool:
    return (Path(path) / STAGE_FILE).is_file()


def save_student(student: Any, out_dir: str | Path, *, base: str, metadata: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float16) -> Path:
    """Write ``model.safetensors`` (floating tensors in ``dtype``) and ``stage.json``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in trainable_state(student).items()}
    save_file(state, str(out / WEIGHTS_FILE))
    head = student.lm_head
    info = {
        "format": FORMAT,
        "base": base,
        "layers": list(student.config.pyramid_layers),
        "sub_vocab": int(head.weight.shape[0]) if isinstance(head, SubVocabHead) else None,
        "dtype": str(dtype).removeprefix("torch."),
        "parameters_shipped": int(sum(v.numel() for v in state.values())),
    } | (metadata or {}) | {"weights": weights_record(out / WEIGHTS_FILE)}
    (out / STAGE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def weights_record(path: str | Path) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a stage's weights, as ``stage.json`` records them (loading
    checks the size, ``pyramid setup`` the sha256 of the shipped family)."""
    return {"size": Path(path).stat().st_size, "sha256": sha256_file(path)}


def student_base(path: str | Path) -> Path:
    """The directory of the model a student stage was distilled from (its embedding, tokenizer)."""
    path = Path(path).expanduser().resolve()
    info = read_json(path / STAGE_FILE)
    if info.get("format") != FORMAT:
        raise ValueError(f"{path / STAGE_FILE}: unknown format {info.get('format')!r} (expected {FORMAT})")
    return _base_dir(str(info["base"]), path)


def _base_dir(base: str, stage_dir: Path) -> Path:
    if base == "smollm2":
        if not smollm2_ready():
            raise ValueError(f"the distilled stage {stage_dir} is built on SmolLM2-135M, which is not set up; "
                             "run `pyramid setup` first")
        return smollm2_dir()
    path = Path(base).expanduser()
    return path if path.is_absolute() else (stage_dir / path).resolve()
