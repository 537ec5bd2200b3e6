"""From specs to a ``Pipeline``: the one place where stages, policies, block lengths, presets,
stage wrappers, sampling and device are resolved through the plugin registries.

``PipelineSpec`` is the frozen description a command builds from its arguments; ``resolve()``
turns it into a ``Pipeline``. Nothing here names a plugin: what is used when the user names
nothing comes from the plugins' declared defaults (``Registry.default``): the default chain of
stages (``register_chains``) and the default policy (``register_policies``).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import attrs

from pyramid_core.calibrated import parse_budgeted
from pyramid_core.calibrated import require as require_budgeted
from pyramid_core.devices import check_device
from pyramid_core.errors import ConfigError, PluginError, PyramidError, TokenizerMismatchError
from pyramid_core.options import DecodeOptions, ExecutionMode, dtype_word
from pyramid_core.pipeline import Pipeline, graft_needs_lookup
from pyramid_core.plugins import HOOKS, Registries, registries
from pyramid_core.protocols import AcceptancePolicy, Proposer, Stage, VerifiesTrees, tokenizer_of
from pyramid_core.recipes import Chain, Preset
from pyramid_core.registry import Registry, parse_spec
from pyramid_core.types import SamplingConfig
from pyramid_core.validate import check_block_lengths, policy_label

__all__ = [
    "PipelineSpec",
    "build_pipeline",
    "make_stage",
    "make_policy",
    "check_same_tokenizer",
    "check_lookup",
    "resolve_preset",
    "default_chain",
    "DEFAULT_BLOCK_LENGTH",
]

T = TypeVar("T")

DEFAULT_BLOCK_LENGTH = 4
"""Block length per boundary when neither the lengths, a preset nor the default chain give one."""

StageLike = str | Stage | Proposer


def _mode_or_none(value: ExecutionMode | bool | str | None) -> ExecutionMode | None:
    return None if value is None else ExecutionMode.parse(value)


def _dtype_or_none(value: object) -> str | None:
    return None if value is None else dtype_word(value)

PolicyLike = str | AcceptancePolicy


def make_stage(spec: StageLike, *, regs: Registries | None = None, vocab_size: int | None = None,
               device: str | None = None, compile: ExecutionMode | None = None, dtype: str | None = None,
               **overrides: Any) -> Stage | Proposer:
    """A stage from ``"name:k=v"``: a registered proposer (given ``vocab_size`` when it takes
    one), else a registered model backend (placed on ``device`` when given, and given the
    execution mode ``compile`` and the ``dtype`` when given and the backend takes them, unless
    the spec sets them; ``None``: the backend's defaults). A loaded stage is returned as it is."""
    if not isinstance(spec, str):
        return spec
    regs = regs or registries()
    name, _ = parse_spec(spec)
    if name in regs.proposers:
        if vocab_size is not None and regs.proposers.accepts(name, "vocab_size"):
            overrides.setdefault("vocab_size", vocab_size)
        return _made(regs.proposers, name, regs.proposers.create(spec, **overrides), Proposer,
                    "a Proposer (an object with propose(context, n, rng) -> Block)")
    if name in regs.backends:
        if device:
            check_device(device)
            overrides["device"] = device
        given = parse_spec(spec)[1]
        if compile is not None and regs.backends.accepts(name, "compile") and "compile" not in given:
            overrides["compile"] = compile
        if dtype is not None and regs.backends.accepts(name, "dtype") and "dtype" not in given:
            overrides["dtype"] = dtype_word(dtype)
        return _made(regs.backends, name, regs.backends.create(spec, **overrides), Stage,
                    "a model Stage (vocab_size, device, score(context, block) -> logits)")
    if name in regs.wrappers:
        raise PluginError(f"{name!r} is a stage wrapper, not a stage: it wraps the bottom model stage of a "
                          f"pipeline; give it as the tree (build_pipeline(..., tree={spec!r}) / --tree {spec})")
    names = regs.proposers.names() + regs.backends.names()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise PluginError(f"unknown stage {name!r}{hint} (proposers: {', '.join(regs.proposers.names()) or 'none'}; "
                      f"backends: {', '.join(regs.backends.names()) or 'none'})")


def _made(registry: Registry[Any], name: str, value: T, kind: type, what: str) -> T:
    """``value``, made by the factory registered as ``name``, if it is a ``kind``; else a
    ``PluginError`` naming the plugin, its hook, what the factory returned and what it must."""
    if isinstance(value, kind):
        return value
    reg = registry.get(name)
    raise PluginError(
        f"{registry.kind} {name!r} (from plugin {reg.plugin!r}, hook {HOOKS[registry.kind]}): its factory returned "
        f"{type(value).__name__} {value!r:.80}; it must return {what}"
    )


def make_policy(spec: PolicyLike, *, regs: Registries | None = None) -> AcceptancePolicy:
    if not isinstance(spec, str):
        return spec
    return (regs or registries()).policies.create(spec)


def resolve_preset(name: str, n_stages: int, *, regs: Registries | None = None) -> Preset:
    """The registered preset ``name`` instantiated for ``n_stages`` stages."""
    presets = (regs or registries()).presets
    entry = presets.get(name)
    try:
        preset = entry.factory(n_stages)
    except ValueError as exc:
        raise ConfigError(f"preset {name!r} (from plugin {entry.plugin!r}): {exc}") from exc
    return _made(presets, name, preset, Preset,
                f"a pyramid_core.recipes.Preset(name, policies, block_lengths) for {n_stages} stages")


def default_chain(regs: Registries | None = None, *, purpose: str = "no stages were given") -> Chain:
    """The chain a plugin declared the default (``register_chains(..., default=True)``)."""
    regs = regs or registries()
    name = regs.chains.default_name(purpose)
    return _made(regs.chains, name, regs.chains.get(name).factory(), Chain,
                "a pyramid_core.recipes.Chain(name, stages, block_lengths)")


def check_same_tokenizer(stages: Sequence[object]) -> None:
    """Fail before any decoding if two stages carry different tokenizers (compared by their
    vocabularies and special tokens). Stages without a tokenizer (``HasTokenizer``) are skipped."""
    ref: tuple[int, str, Any] | None = None
    for i, stage in enumerate(stages):
        tok = tokenizer_of(stage)
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


def _per_boundary(values: Sequence[Any], n: int, what: str) -> list[Any]:
    if len(values) != n - 1:
        raise ConfigError(f"{n} stages need {n - 1} {what} (one per boundary), got {len(values)}")
    return list(values)


def _tuple_or_none(value: Sequence[Any] | None) -> tuple[Any, ...] | None:
    return None if value is None else tuple(value)


def _stages(value: Sequence[StageLike]) -> tuple[StageLike, ...]:
    return tuple(value)


@attrs.frozen(eq=False)
class PipelineSpec:
    """Everything that defines a pipeline, before anything is loaded.

    stages:         specs (``"smollm2:stage=draft"``, ``"ngram"``) or loaded stages, smallest
                    first, the target last; empty: the default chain's stages (and its lengths)
    policies:       one per boundary; ``None``: the preset's, else the default policy everywhere
    block_lengths:  one per boundary; ``None``: the preset's, else the default chain's, else 4
    preset:         a registered preset (policies and lengths); excludes ``policies``. With a
                    budget (``"psd-f:budget=0.05"``): the preset's thresholds and lengths that
                    the quality-budget planner recorded for these stage specs and this sampler
                    (``pyramid_core.calibrated``); excludes ``block_lengths`` too
    tree:           a registered stage wrapper spec (``"tree:budget=8,branching=4"``) around the
                    bottom model stage
    sampling:       applied identically at every stage
    device:         where model backends are placed (``None``: each backend's default)
    stop_ids:       ``None``: the target tokenizer's end-of-sequence token, if any
    compile:        the execution mode of model backends that have one (``ExecutionMode``; a bool
                    or a word is parsed once, here); ``None``: each backend's default (a stage
                    spec's own ``compile=`` wins)
    dtype:          the dtype of model backends that take one (``auto``, ``float32``,
                    ``bfloat16``, ``float16``); ``None``: each backend's default (a stage spec's
                    own ``dtype=`` wins)
    length_schedule: ``"fixed"`` block lengths, or ``"adaptive"`` (+2 after a fully accepted
                    block, -1 otherwise; ``pyramid_core.schedule``), at every boundary
    confidence_stop: > 0: a model bottom stage ends its block after a token whose row's largest
                    probability is below this (0: off)
    on_nonfinite:   ``"raise"`` (default) or ``"warn"``: what a NaN / +inf logit does
                    (``Pipeline``)
    lookup:         a registered model-free proposer spec (``"ngram:min_ngram=1,max_ngram=4"``)
                    asked first each round at the bottom boundary; stage 1 (or its tree) drafts
                    only in the rounds it proposes nothing (``pipeline.LookupFirst``)
    lookup_graft:   with a lookup, stage 1 (or its tree) drafts every round and the lookup's block
                    is grafted into its block as one more path, verified in the same forward

    ``resolve`` checks everything that needs no model first -- block lengths, policies, the
    wrapper's name, a tree against the policy that verifies it, the device -- so a mistake is
    reported before any stage is loaded.
    """

    stages: tuple[StageLike, ...] = attrs.field(default=(), converter=_stages)
    policies: tuple[PolicyLike, ...] | None = attrs.field(default=None, converter=_tuple_or_none)
    block_lengths: tuple[int, ...] | None = attrs.field(default=None, converter=_tuple_or_none)
    preset: str | None = None
    tree: str | None = None
    sampling: SamplingConfig = attrs.field(factory=SamplingConfig)
    device: str | None = None
    stop_ids: tuple[int, ...] | None = attrs.field(default=None, converter=_tuple_or_none)
    compile: ExecutionMode | None = attrs.field(default=None, converter=_mode_or_none)
    length_schedule: str = "fixed"
    confidence_stop: float = 0.0
    on_nonfinite: str = "raise"
    dtype: str | None = attrs.field(default=None, converter=_dtype_or_none)
    lookup: str | Proposer | None = None
    lookup_graft: bool = False
    decode: DecodeOptions = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if self.preset is not None and self.policies is not None:
            raise ConfigError(f"give either a preset ({self.preset!r}) or policies, not both")
        decode = DecodeOptions(self.sampling, self.stop_ids, self.length_schedule, self.confidence_stop,
                               self.on_nonfinite)  # every decode option checked here, once
        object.__setattr__(self, "decode", decode)

    def parts(self, regs: Registries | None = None) -> tuple[tuple[StageLike, ...], list[PolicyLike], list[int]]:
        """(stages, a policy per boundary, a block length per boundary), defaults filled in and
        counts checked, without loading anything."""
        regs = regs or registries()
        stages, chain_lengths = self.stages, None
        if not stages:
            chain = default_chain(regs, purpose="no stages were given")
            stages, chain_lengths = chain.stages, chain.block_lengths
        n = len(stages)
        lengths = self.block_lengths
        if self.preset is not None:
            name, budget = parse_budgeted(self.preset)
            preset = resolve_preset(name, n, regs=regs)  # the name and the stage count checked first
            policies: Sequence[PolicyLike] = preset.policies
            if budget is not None:
                if self.block_lengths is not None:
                    raise ConfigError(f"preset {self.preset!r}: its block lengths are part of what was calibrated "
                                      "within the budget; give no block lengths with it")
                record = require_budgeted(name, budget, stages, self.sampling)
                policies, lengths = record.policies, record.block_lengths
            lengths = lengths if lengths is not None else preset.block_lengths
        elif self.policies is not None:
            policies = self.policies
        else:
            policies = [regs.policies.default_name("no policy was given")] * (n - 1) if n > 1 else []
        if lengths is None:
            lengths = chain_lengths if chain_lengths is not None else (DEFAULT_BLOCK_LENGTH,) * (n - 1)
        return (tuple(stages), _per_boundary(policies, n, "acceptance policies"),
                check_block_lengths(_per_boundary(lengths, n, "block lengths")))

    def load_stages(self, regs: Registries | None = None) -> list[Stage | Proposer]:
        """The stages, loaded: the target first (a proposer below it gets its vocabulary size),
        every model backend on ``device``; tokenizers checked to agree."""
        regs = regs or registries()
        specs = self.parts(regs)[0]
        target = make_stage(specs[-1], regs=regs, device=self.device, compile=self.compile, dtype=self.dtype)
        if not isinstance(target, Stage):
            raise ConfigError(f"the target (stage {len(specs)}, {specs[-1]!r}) must be a model stage, not a proposer")
        resolved = [make_stage(s, regs=regs, vocab_size=target.vocab_size, device=self.device, compile=self.compile,
                               dtype=self.dtype)
                    for s in specs[:-1]]
        resolved.append(target)
        check_same_tokenizer(resolved)
        return resolved

    def loaded(self, regs: Registries | None = None) -> PipelineSpec:
        """The same spec with its stages loaded (``load_stages``) -- to build several pipelines
        over one load -- and, where they came from the default chain, its block lengths pinned."""
        regs = regs or registries()
        if self.preset is not None and parse_budgeted(self.preset)[1] is not None:
            # a budgeted preset is looked up by the stage specs: resolved to its record before loading
            _, resolved_policies, resolved_lengths = self.parts(regs)
            return attrs.evolve(self, stages=tuple(self.load_stages(regs)), preset=None,
                                policies=tuple(resolved_policies), block_lengths=tuple(resolved_lengths))
        lengths = self.parts(regs)[2] if not self.stages and self.preset is None else self.block_lengths
        return attrs.evolve(self, stages=tuple(self.load_stages(regs)), block_lengths=lengths)

    def resolve(self, regs: Registries | None = None) -> Pipeline:
        """The ``Pipeline`` this spec describes."""
        regs = regs or registries()
        specs, policy_specs, lengths = self.parts(regs)
        policies = [make_policy(p, regs=regs) for p in policy_specs]
        if self.tree is not None:
            _check_wrapper(self.tree, regs)  # before any loading
            if policies:
                _check_tree_policy(f"tree={self.tree!r} drafts token trees", "the tree", policies[0], policy_specs[0],
                                   regs)
        if self.lookup is not None:
            check_lookup(self.lookup, len(specs), regs)  # before any loading
            if self.lookup_graft and policies:
                _check_tree_policy("lookup_graft verifies token trees", "lookup_graft", policies[0], policy_specs[0], regs)
        graft_needs_lookup(self.lookup, self.lookup_graft)  # before any loading
        resolved = self.load_stages(regs)
        target = resolved[-1]
        stop_ids = self.decode.stop_ids
        if stop_ids is None:
            eos = getattr(tokenizer_of(target), "eos_token_id", None)
            stop_ids = () if eos is None else (int(eos),)
        if self.tree is not None:
            if len(resolved) < 2 or not isinstance(resolved[0], Stage):
                raise ConfigError(
                    f"tree={self.tree!r} wraps the bottom model stage of a pipeline of at least 2 stages; "
                    f"stage 1 ({specs[0]!r}) is {'the target' if len(resolved) < 2 else 'not a model stage'}"
                )
            extra: dict[str, Any] = {}
            if regs.wrappers.accepts(parse_spec(self.tree)[0], "on_nonfinite"):
                extra["on_nonfinite"] = self.decode.on_nonfinite
            wrapped = regs.wrappers.create(self.tree, stage=resolved[0], sampling=self.decode.sampling,
                                           stop_ids=list(stop_ids), **extra)
            resolved[0] = _made(regs.wrappers, parse_spec(self.tree)[0], wrapped, Proposer,
                               "a Proposer (an object with propose(context, n, rng) -> Block) wrapping the stage")
        names = [_policy_name(spec, policy, regs) for spec, policy in zip(policy_specs, policies, strict=True)]
        vocab = cast(Stage, target).vocab_size  # load_stages checked the target is a model Stage
        lookup = None if self.lookup is None else make_stage(self.lookup, regs=regs, vocab_size=vocab)
        return Pipeline.with_options(resolved, policies, lengths, attrs.evolve(self.decode, stop_ids=stop_ids), names,
                                     lookup, self.lookup_graft)  # type: ignore[arg-type]  # a Stage is refused by Pipeline


def check_lookup(lookup: str | Proposer, n_stages: int, regs: Registries) -> None:
    """A lookup names a registered proposer (a model-free one) and has a stage above it to draft
    for; checked before any stage is loaded."""
    if n_stages < 2:
        raise ConfigError(f"lookup={lookup!r} proposes to the stage above the bottom one; a pipeline of the "
                          "target alone has none")
    if not isinstance(lookup, str):
        return
    name = parse_spec(lookup)[0]
    if name in regs.backends:
        raise ConfigError(f"lookup={lookup!r} names a model backend; the lookup is a model-free proposer "
                          f"({', '.join(regs.proposers.names()) or 'none is loaded'}), and a model drafts as stage 1")
    if name not in regs.proposers:
        regs.proposers.get(name)  # unknown: "did you mean"


def _policy_name(spec: PolicyLike, policy: AcceptancePolicy, regs: Registries) -> str:
    """How errors name a policy: its spec and plugin when it was named, else its label."""
    if not isinstance(spec, str):
        return policy_label(policy)
    name = parse_spec(spec)[0]
    return f"{spec!r} (from plugin {regs.policies.get(name).plugin!r})" if name in regs.policies else repr(spec)


def _check_wrapper(tree: str, regs: Registries) -> None:
    """``tree`` names a registered stage wrapper (a stage's name given as the tree is named so)."""
    name = parse_spec(tree)[0]
    if name in regs.wrappers:
        return
    kind = "proposer" if name in regs.proposers else "backend" if name in regs.backends else None
    if kind is not None:
        raise PluginError(f"{regs.wrappers.unknown_message(name)}: {name!r} is a {kind}, a stage of its own -- "
                          f"give it as a stage (--stage {tree}), not as the tree")
    regs.wrappers.get(name)  # unknown: "did you mean"


def _check_tree_policy(what: str, option: str, policy: AcceptancePolicy, spec: PolicyLike, regs: Registries) -> None:
    """A tree (``what`` makes it; ``option`` is what to drop) drafted into a policy that declares it
    verifies chains only (``VerifiesTrees``)."""
    if not isinstance(policy, VerifiesTrees) or policy.verifies_trees:
        return
    able = []
    for name in regs.policies.names():
        try:
            candidate = regs.policies.create(name)
        except PyramidError:
            continue
        if isinstance(candidate, VerifiesTrees) and candidate.verifies_trees:
            able.append(name)
    raise ConfigError(
        f"{what} at boundary 1 -> 2, but its policy {spec if isinstance(spec, str) else policy!r} "
        "verifies chains only; "
        f"use a policy that verifies trees there ({', '.join(able) or 'none is loaded'}) or drop {option}"
    )


def build_pipeline(
    stages: Sequence[StageLike],
    policies: Sequence[PolicyLike] | None = None,
    block_lengths: Sequence[int] | None = None,
    *,
    sampling: SamplingConfig | None = None,
    stop_ids: Sequence[int] | None = None,
    preset: str | None = None,
    tree: str | None = None,
    device: str | None = None,
    compile: ExecutionMode | bool | str | None = None,
    length_schedule: str = "fixed",
    confidence_stop: float = 0.0,
    regs: Registries | None = None,
    on_nonfinite: str = "raise",
    dtype: str | None = None,
    lookup: str | Proposer | None = None,
    lookup_graft: bool = False,
) -> Pipeline:
    """``PipelineSpec(...).resolve(regs)``: policies default to the default policy (``exact``)
    at every boundary and block lengths to 4; a ``preset`` (e.g. ``"psd-f"``) supplies both
    instead (explicit ``block_lengths`` still win). ``stop_ids`` default to the target's EOS
    token. ``tree`` (e.g. ``"tree:branching=4-2-1,replacement=false"``) names a registered stage
    wrapper around the bottom model stage; ``compile``, ``dtype``, ``length_schedule`` and
    ``confidence_stop``, ``lookup`` (e.g. ``"ngram"``) and ``lookup_graft`` as in ``PipelineSpec``; ``on_nonfinite``:
    ``"raise"`` or ``"warn"`` (``Pipeline``)."""
    if not stages:
        raise ConfigError("a pipeline needs at least one stage (the target)")
    spec = PipelineSpec(stages, policies, block_lengths, preset, tree, sampling or SamplingConfig(), device, stop_ids,
                        compile, length_schedule, confidence_stop, on_nonfinite, dtype, lookup, lookup_graft)
    return spec.resolve(regs)
