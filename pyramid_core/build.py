"""Build pipelines from spec strings through the plugin registries (what the CLI uses)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from pyramid_core.errors import ConfigError, PluginError, TokenizerMismatchError
from pyramid_core.pipeline import Pipeline
from pyramid_core.plugins import Registries, registries
from pyramid_core.presets import Preset
from pyramid_core.protocols import AcceptancePolicy, Proposer, Stage
from pyramid_core.registry import parse_spec
from pyramid_core.types import SamplingConfig

__all__ = ["build_pipeline", "make_stage", "make_stage_on", "make_policy", "check_same_tokenizer", "resolve_preset"]


def _accepts(factory: Any, param: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return param in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def make_stage(spec: str | Stage | Proposer, *, vocab_size: int | None = None, regs: Registries | None = None, **overrides: Any) -> Stage | Proposer:
    """A stage from ``"name:k=v"``: a registered proposer, else a registered backend."""
    if not isinstance(spec, str):
        return spec
    regs = regs or registries()
    name, _ = parse_spec(spec)
    if name in regs.proposers:
        if vocab_size is not None and _accepts(regs.proposers.get(name).factory, "vocab_size"):
            overrides.setdefault("vocab_size", vocab_size)
        return regs.proposers.create(spec, **overrides)
    if name in regs.backends:
        return regs.backends.create(spec, **overrides)
    names = regs.proposers.names() + regs.backends.names()
    import difflib

    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise PluginError(f"unknown stage {name!r}{hint} (proposers: {', '.join(regs.proposers.names()) or 'none'}; "
                      f"backends: {', '.join(regs.backends.names()) or 'none'})")


def make_stage_on(spec: str | Stage | Proposer, device: str | None, **overrides: Any) -> Stage | Proposer:
    """``make_stage``, with a model backend placed on ``device`` (``None``: the backend's
    default); proposers such as ``ngram`` run wherever their verifier is and take no device."""
    if device and isinstance(spec, str) and parse_spec(spec)[0] in registries().backends:
        overrides["device"] = device
    return make_stage(spec, **overrides)


def make_policy(spec: str | AcceptancePolicy, *, regs: Registries | None = None) -> AcceptancePolicy:
    if not isinstance(spec, str):
        return spec
    return (regs or registries()).policies.create(spec)


def resolve_preset(name: str, n_stages: int) -> Preset:
    """The registered preset ``name`` instantiated for ``n_stages`` stages."""
    reg = registries().presets
    entry = reg.get(name)
    try:
        return entry.factory(n_stages)
    except ValueError as exc:
        raise ConfigError(f"preset {name!r} (from plugin {entry.plugin!r}): {exc}") from exc


def check_same_tokenizer(stages: Sequence[object]) -> None:
    """Fail before any decoding if two stages carry different tokenizers (compared by their
    vocabularies and special tokens). Stages without a ``tokenizer`` attribute are skipped."""
    ref: tuple[int, str, Any] | None = None
    for i, stage in enumerate(stages):
        tok = getattr(stage, "tokenizer", None)
        if tok is None:
            continue
        name = getattr(stage, "name", f"stage {i + 1}")
        vocab = tok.get_vocab()
        special = {k: getattr(tok, k, None) for k in ("bos_token_id", "eos_token_id", "unk_token_id")}
        if ref is None:
            ref = (i, name, (vocab, special))
            continue
        ref_vocab, ref_special = ref[2]
        if vocab != ref_vocab:
            diff = sorted(set(vocab.items()) ^ set(ref_vocab.items()))[:3]
            raise TokenizerMismatchError(
                f"stage {i + 1} ({name}) does not share the tokenizer of stage {ref[0] + 1} ({ref[1]}): "
                f"vocabularies differ ({len(vocab)} vs {len(ref_vocab)} entries; e.g. {diff})"
            )
        if special != ref_special:
            raise TokenizerMismatchError(
                f"stage {i + 1} ({name}) and stage {ref[0] + 1} ({ref[1]}) disagree on special tokens: {special} vs {ref_special}"
            )


def build_pipeline(
    stages: Sequence[str | Stage | Proposer],
    policies: Sequence[str | AcceptancePolicy] | None = None,
    block_lengths: Sequence[int] | None = None,
    *,
    sampling: SamplingConfig | None = None,
    stop_ids: Sequence[int] | None = None,
    preset: str | None = None,
    tree: str | None = None,
) -> Pipeline:
    """Resolve specs and build a ``Pipeline``. Policies default to ``exact`` at every boundary and
    block lengths to 4; a ``preset`` (e.g. ``"psd-f"``) supplies both instead (explicit
    ``block_lengths`` still win). ``stop_ids`` default to the target's EOS token.

    ``tree`` (e.g. ``"tree:branching=4-2-1,replacement=false"``) names a registered proposer that
    wraps the bottom model stage and drafts token trees; it is created with the keywords
    ``stage`` (the resolved bottom stage), ``sampling`` and ``stop_ids``."""
    if not stages:
        raise ConfigError("a pipeline needs at least one stage (the target)")
    n = len(stages)
    if preset is not None:
        if policies is not None:
            raise ConfigError(f"give either a preset ({preset!r}) or policies, not both")
        plan = resolve_preset(preset, n)
        policies = list(plan.policies)
        block_lengths = list(block_lengths) if block_lengths is not None else list(plan.block_lengths)
    regs = registries() if any(isinstance(s, str) for s in [*stages, *(policies or [])]) or policies is None else None
    target = make_stage(stages[-1], regs=regs)
    if not isinstance(target, Stage):
        raise ConfigError(f"the target (stage {n}, {stages[-1]!r}) must be a model stage, not a proposer")
    resolved = [make_stage(s, vocab_size=target.vocab_size, regs=regs) for s in stages[:-1]] + [target]
    check_same_tokenizer(resolved)
    pols = [make_policy(p, regs=regs) for p in (policies if policies is not None else ["exact"] * (n - 1))]
    lengths = list(block_lengths) if block_lengths is not None else [4] * (n - 1)
    if stop_ids is None:
        tok = getattr(target, "tokenizer", None)
        eos = getattr(tok, "eos_token_id", None) if tok is not None else None
        stop_ids = [] if eos is None else [int(eos)]
    sampling = sampling or SamplingConfig()
    if tree is not None:
        if n < 2 or not isinstance(resolved[0], Stage):
            raise ConfigError(
                f"tree={tree!r} wraps the bottom model stage of a pipeline of at least 2 stages; "
                f"stage 1 ({stages[0]!r}) is {'the target' if n < 2 else 'not a model stage'}"
            )
        resolved[0] = (regs or registries()).proposers.create(
            tree, stage=resolved[0], sampling=sampling, stop_ids=list(stop_ids)
        )
    return Pipeline(resolved, pols, lengths, sampling, list(stop_ids))
