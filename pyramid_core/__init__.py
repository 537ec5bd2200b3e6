"""pyramid: multi-stage speculative decoding with pluggable acceptance rules."""

import logging

from pyramid_core.build import (
    PipelineSpec,
    build_pipeline,
    check_same_tokenizer,
    make_policy,
    make_stage,
)
from pyramid_core.errors import (
    ConfigError,
    NonFiniteError,
    PluginError,
    PolicyOutputError,
    PyramidError,
    StageOutputError,
    TokenizerMismatchError,
)
from pyramid_core.pipeline import Generation, Metrics, Pipeline, TextGeneration
from pyramid_core.protocols import AcceptancePolicy, Proposer, Stage, Verifier
from pyramid_core.rng import Rng
from pyramid_core.types import (
    Block,
    BoundaryStats,
    GenerationOptions,
    SamplingConfig,
    StageStats,
    Verdict,
)

__version__ = "0.1.0"

# a library logs (``logging.getLogger(__name__)`` in each module) and leaves the handlers to the
# application; the ``pyramid`` command gives these loggers one stderr handler (``cli.main``)
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AcceptancePolicy",
    "Block",
    "BoundaryStats",
    "ConfigError",
    "Generation",
    "GenerationOptions",
    "Metrics",
    "NonFiniteError",
    "Pipeline",
    "PipelineSpec",
    "PluginError",
    "PolicyOutputError",
    "Proposer",
    "PyramidError",
    "Rng",
    "SamplingConfig",
    "Stage",
    "StageOutputError",
    "StageStats",
    "TextGeneration",
    "TokenizerMismatchError",
    "Verdict",
    "Verifier",
    "build_pipeline",
    "check_same_tokenizer",
    "make_policy",
    "make_stage",
]
