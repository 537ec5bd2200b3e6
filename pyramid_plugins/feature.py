"""``feature``: feature-level drafts (EAGLE family) as a model backend -- a draft that reads the
hidden states of a stage above it (``pyramid_core.backends.hf.head_stage``;
[feature-level drafts](../../algorithms.md#feature-level-drafts))::

    feature:path=DIR                          a head trained by `pyramid distill feature`
    feature:path=DIR,features_from=target     read the target's features instead of the next stage's
    feature:path=DIR                          an EAGLE-3 head in the speculators format (vLLM's; its
                                              target from its config.json)
    feature:path=DIR,base=TARGET              ... on another copy of its target (a directory or id)
    feature:base=DIR,variant=eagle3,layers=(0,1,-1),depth=1,seed=0
                                              an untrained head on the model in DIR (tests, demos)
    smollm2:stage=feature                     the head shipped with the SmolLM2 family

The stage is a ``Stage``, so it drafts chains through the pipeline's autoregressive proposer and
token trees through ``tree`` (``--tree tree:budget=16,branching=4``: the most probable nodes
expanded first, as EAGLE-2's dynamic trees); the pipeline attaches its feature source when it is
built, and a source that cannot provide features is a build error naming both stages.
"""

from __future__ import annotations

from typing import Any

import torch

from pyramid_core.backends.hf.head import FeatureHead, FeatureHeadConfig, is_feature_dir
from pyramid_core.backends.hf.head_stage import FeatureStage, load_feature_stage
from pyramid_core.backends.hf.hub import resolve_model_dir
from pyramid_core.backends.hf.speculators import is_speculators_dir
from pyramid_core.errors import ConfigError
from pyramid_core.hookspecs import hookimpl
from pyramid_core.options import ExecutionMode

__all__ = ["feature_stage", "untrained_feature_stage"]


def _layers(text: str) -> tuple[int, ...]:
    """``"-1"`` or ``"2,14,-1"`` (in a spec: ``layers=(2,14,-1)``)."""
    try:
        out = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise ConfigError(f"feature: layers must be comma-separated layer numbers like (2,14,-1), got {text!r}") from None
    if not out:
        raise ConfigError(f"feature: layers must name at least one layer, got {text!r}")
    return out


def feature_stage(path: str = "", base: str = "", features_from: str = "next", device: str = "cpu",
                  dtype: str = "auto", compile: ExecutionMode = ExecutionMode.EAGER, variant: str = "eagle1", layers: str = "-1",
                  depth: int = 1, sub_vocab: int = 0, seed: int = 0) -> FeatureStage:
    """A trained head (``path=``; ``base=``: its target, where the head's record is not enough) or
    an untrained one on a Hugging Face model (``base=`` alone)."""
    if not path and not base:
        raise ConfigError("feature: give path=DIR (a head trained by `pyramid distill feature`, or an EAGLE-3 head "
                          "in the speculators format) or base=DIR (an untrained head on that model)")
    if path:
        directory = resolve_model_dir(path)  # a local directory, or a Hugging Face id
        if not (is_feature_dir(directory) or is_speculators_dir(directory)):
            raise ConfigError(f"feature: {path} holds no feature head (no stage.json of format pyramid-feature-stage/1, "
                              "no speculators config.json)")
        try:
            return load_feature_stage(str(directory), device=device, dtype=dtype, features_from=features_from,
                                      compile=compile, base=base or None)
        except ValueError as exc:
            raise ConfigError(f"feature:path={path}: {exc}") from None
    if sub_vocab:
        raise ConfigError("feature: an untrained head takes the base model's LM head (sub_vocab=0); "
                          "a sub-vocabulary head comes from training (`pyramid distill feature --sub-vocab K`)")
    return untrained_feature_stage(base, variant=variant, layers=_layers(layers), depth=depth, seed=seed,
                                   features_from=features_from, device=device, dtype=dtype, compile=compile)


def untrained_feature_stage(base: str, *, variant: str = "eagle1", layers: tuple[int, ...] = (-1,), depth: int = 1,
                            seed: int = 0, features_from: str = "next", device: str = "cpu", dtype: str = "auto",
                            compile: ExecutionMode = ExecutionMode.EAGER) -> FeatureStage:
    """A freshly initialised head (seeded) on the model in directory ``base`` (or a Hugging Face id)."""
    from pyramid_core.backends.hf.loading import load_model, load_tokenizer

    try:
        cfg = FeatureHeadConfig(layers=layers, variant=variant, depth=depth)
        model = load_model(base, device=device, dtype=dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = FeatureHead(model, cfg)
        return FeatureStage(head, load_tokenizer(resolve_model_dir(base)), name=f"feature[{variant},untrained]",
                            features_from=features_from, compile=compile)
    except ValueError as exc:
        raise ConfigError(f"feature:base={base}: {exc}") from None


@hookimpl
def register_backends(register: Any) -> None:
    register("feature", feature_stage,
             "a feature-level draft (EAGLE family) reading a stage above it: feature:path=DIR (trained by `pyramid "
             "distill feature`) or base=DIR (untrained); features_from=next|target, device=, compile=false|true|auto")
