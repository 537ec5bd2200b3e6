"""What the commands share: the sampling options, argument types that refuse bad values with the
flag's name, and turning ``--stage`` / ``--policy`` / ``--length`` / ``--preset`` / ``--tree`` /
``--lookup`` / ``--lookup-graft`` / ``--device`` / ``--nonfinite`` into a ``PipelineSpec``."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from pyramid_core.build import PipelineSpec
from pyramid_core.cli.argtypes import block_length, int_at_least, seed_value
from pyramid_core.errors import ConfigError
from pyramid_core.options import DTYPE_WORDS, ExecutionMode, dtype_word
from pyramid_core.schedule import SCHEDULES
from pyramid_core.types import SamplingConfig
from pyramid_core.validate import NONFINITE_MODES

__all__ = ["sampling_args", "sampling", "pipeline_args", "pipeline_spec", "compile_arg", "nonfinite_arg",
           "int_at_least", "block_length", "show_progress"]


def show_progress(ns: argparse.Namespace) -> bool:
    """Progress bars (on stderr) unless ``-q`` / ``--quiet``."""
    return not getattr(ns, "quiet", 0)


def _sampling_field(name: str) -> Callable[[str], float]:
    """An argparse type validated by ``SamplingConfig`` itself (one rule, one message)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            SamplingConfig(**{name: value})
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace(f"SamplingConfig.{name} ", "")) from None
        return value

    parse.__name__ = name
    return parse


def sampling_args(p: argparse.ArgumentParser, default_temperature: float, *,
                  title: str = "sampling (applied identically at every stage)",
                  temperature_help: str | None = None, seed: bool = True) -> argparse._ArgumentGroup:
    """``--temperature``, ``--top-k``, ``--top-p`` (validated by ``SamplingConfig``) and, with
    ``seed``, ``--seed``; returns the group (a command adds its own options to it)."""
    g = p.add_argument_group(title)
    g.add_argument("--temperature", type=_sampling_field("temperature"), default=default_temperature,
                   help=temperature_help or f"0 = greedy (default {default_temperature})")
    g.add_argument("--top-k", type=int_at_least(0, " (0 = off)"), default=0,
                   help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=_sampling_field("top_p"), default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    if seed:
        g.add_argument("--seed", type=seed_value, default=0,
                       help="makes the run reproducible (an integer in [0, 2**63))")
    return g


def sampling(ns: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p)


def pipeline_args(p: argparse.ArgumentParser, *, default_length: str) -> None:
    """``--policy``, ``--length`` and ``--preset`` (per boundary, smallest first)."""
    p.add_argument("--policy", action="append", metavar="POLICY",
                   help="one per boundary, smallest first (default: the default policy, exact)")
    p.add_argument("--length", action="append", type=block_length, metavar="L",
                   help=f"block length per boundary, smallest first, never decreasing upwards (default {default_length})")
    p.add_argument("--preset", help="sd | fsd | psd-a | psd-f (or a plugin's): policies and block lengths; "
                   "NAME:budget=NATS: the thresholds `pyramid plan --quality-budget NATS --preset NAME` recorded")
    p.add_argument("--length-schedule", choices=sorted(SCHEDULES), default="fixed",
                   help="fixed block lengths, or adaptive: +2 after a fully accepted block, -1 otherwise "
                        "(Hugging Face's heuristic schedule), at every boundary; exact either way")
    p.add_argument("--confidence-stop", type=float, default=0.0, metavar="P",
                   help="a model draft ends its block after a token whose row's largest probability is below P "
                        "(like HF's assistant_confidence_threshold; 0 = off); exact")
    p.add_argument("--lookup", metavar="PROPOSER",
                   help="a model-free proposer asked first each round, e.g. ngram or ngram:min_ngram=2: the first "
                        "stage drafts only in the rounds it proposes nothing (prompt lookup, then the draft); exact")
    p.add_argument("--lookup-graft", action="store_true",
                   help="with --lookup: the first stage drafts every round and the lookup's block joins it as one "
                        "more path of a token tree, verified in the same forward (needs a policy that verifies "
                        "trees, e.g. exact); exact")


def compile_arg(p: argparse.ArgumentParser) -> None:
    """``--compile`` / ``--no-compile``: the model stages' execution mode (default ``auto``: the
    mode measured fastest on this machine, per fed length); ``--dtype``: their dtype (default
    ``auto``: bfloat16 where the device computes it natively)."""
    p.set_defaults(compile=ExecutionMode.AUTO)
    p.add_argument("--compile", dest="compile", action="store_const", const=ExecutionMode.FAST,
                   help="run model stages in the fast execution mode (oneDNN pre-packed weights on CPU); "
                        "default: each stage times its modes once on this machine and runs the fastest")
    p.add_argument("--no-compile", dest="compile", action="store_const", const=ExecutionMode.EAGER,
                   help="run model stages eagerly")
    p.add_argument("--dtype", type=_dtype_arg, default="auto", metavar="|".join(DTYPE_WORDS),
                   help="dtype of the model stages and the HF baselines (default auto: bfloat16 on CUDA and on "
                        "CPUs with AMX or AVX512-BF16, float32 elsewhere); a stage spec's own dtype= wins")


def _dtype_arg(text: str) -> str:
    try:
        return dtype_word(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def nonfinite_arg(p: argparse.ArgumentParser) -> None:
    """``--nonfinite raise|warn``: what a NaN or +inf logit of a stage does (``Pipeline``)."""
    p.add_argument("--nonfinite", choices=NONFINITE_MODES, default="raise",
                   help="a stage returning NaN or +inf logits: raise an error naming the stage and position "
                        "(default), or warn and give those entries zero probability (probing broken models)")


def pipeline_spec(ns: argparse.Namespace, stages: Sequence[Any], *, default_length: int | None = None,
                  tree: str | None = None, device: str | None = None) -> PipelineSpec:
    """The spec of ``stages`` from the parsed options. ``default_length`` (when given) is the
    block length at every boundary unless ``--length`` or ``--preset`` say otherwise; without it
    the spec's own defaults apply (the default chain's lengths when ``stages`` is empty)."""
    lengths = ns.length
    if lengths is None and default_length is not None and ns.preset is None and stages:
        lengths = [default_length] * (len(stages) - 1)
    return PipelineSpec(tuple(stages), ns.policy, lengths, ns.preset, tree, sampling(ns), device,
                        compile=getattr(ns, "compile", None), dtype=getattr(ns, "dtype", None),
                        length_schedule=getattr(ns, "length_schedule", "fixed"),
                        confidence_stop=getattr(ns, "confidence_stop", 0.0),
                        on_nonfinite=getattr(ns, "nonfinite", "raise"), lookup=getattr(ns, "lookup", None),
                        lookup_graft=getattr(ns, "lookup_graft", False))
