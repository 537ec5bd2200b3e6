"""The hooks a pyramid plugin can implement.

A plugin is a module (or object) with functions marked ``@hookimpl``, exposed through the
entry-point group ``pyramid_core``::

    [project.entry-points.pyramid_core]
    my_rules = "my_package.rules"

Every hook receives a ``register(name, factory, description="", *, default=False)`` callback.
``factory`` is called with keyword parameters parsed from a spec such as ``"name:key=value,..."``
(values are converted using the factory's annotations; a parameter annotated with a registered
kind such as ``AcceptancePolicy`` takes a nested spec, ``assisted:inner=(fuzzy:tau=0.3)``).
``default=True`` declares the registration the default of its kind -- what the framework uses
when the user names none (the built-in ``exact`` policy and the family's ``smollm2-family`` chain do);
at most one plugin may declare a default per kind, and when that plugin is disabled the
framework says so instead of falling back to a name of its own. The built-in plugins use these
hooks exactly like a third-party package does.
"""

from __future__ import annotations

from typing import Any

import pluggy

__all__ = ["hookspec", "hookimpl", "PROJECT"]

PROJECT = "pyramid_core"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_policies(register: Any) -> None:
    """Register acceptance policies.

    ``register(name, factory, description="")`` where ``factory(**params)`` returns an object
    with ``decide(block, p, rng) -> Verdict`` (the ``AcceptancePolicy`` protocol). A policy is
    chosen per stage boundary, e.g. ``--policy exact``.
    """


@hookspec
def register_proposers(register: Any) -> None:
    """Register model-free proposers usable as the first (smallest) stage.

    ``register(name, factory, description="")`` where ``factory(**params)`` returns an object
    with ``propose(context, n, rng) -> Block`` (the ``Proposer`` protocol), e.g. ``ngram``.
    """


@hookspec
def register_backends(register: Any) -> None:
    """Register model backends: loaders that turn a location into a model ``Stage``.

    ``register(name, factory, description="")`` where ``factory(**params)`` returns an object
    satisfying the ``Stage`` protocol (``score(context, block)``, ``reset()``, ``vocab_size``,
    ``device``, ``name``), e.g. ``hf:path=/models/x,device=cuda,dtype=bfloat16``.
    """


@hookspec
def register_divergences(register: Any) -> None:
    """Register divergences for divergence-threshold (fuzzy) acceptance.

    ``register(name, fn, description="")`` where ``fn(p, q)`` maps verifier rows ``p`` and
    proposer rows ``q`` (``Float[Tensor, "n vocab"]``) to ``Float[Tensor, "n"]`` divergences in
    natural-log units (nats), e.g. ``js``. Chosen with ``fuzzy:div=NAME``.
    """


@hookspec
def register_presets(register: Any) -> None:
    """Register presets: named recipes of policies and block lengths.

    ``register(name, factory, description="")`` where ``factory(n_stages)`` returns a
    ``pyramid_core.recipes.Preset`` (policy specs and block lengths, one per boundary) or raises
    ``ValueError`` naming the stage counts it supports, e.g. ``psd-f`` for three stages.
    """


@hookspec
def register_wrappers(register: Any) -> None:
    """Register stage wrappers: proposers built around the bottom model stage of a pipeline.

    ``register(name, factory, description="")`` where ``factory(stage, *, sampling, stop_ids,
    **params)`` receives the resolved bottom ``Stage``, the pipeline's ``SamplingConfig`` and stop
    token ids, and returns a ``Proposer`` (e.g. ``tree``, which drafts token trees). Chosen with
    ``PipelineSpec(tree="tree:budget=8")`` / ``build_pipeline(..., tree=...)`` / ``--tree
    tree:budget=8``. A factory that accepts ``on_nonfinite`` is also given the pipeline's
    ``"raise"`` / ``"warn"`` (what NaN or +inf logits of its stage do;
    ``pyramid_core.validate.score_checked``).
    """


@hookspec
def register_chains(register: Any) -> None:
    """Register named chains of stages: what ``generate``, ``bench`` and ``sweep`` run when no
    ``--stage`` is given.

    ``register(name, factory, description="", default=False)`` where ``factory()`` returns a
    ``pyramid_core.recipes.Chain`` (stage specs smallest first, the target last, and a block
    length per boundary), e.g. ``smollm2-family``.
    """


@hookspec
def register_commands(register: Any) -> None:
    """Register ``pyramid`` subcommands.

    ``register(name, configure, description="")`` where ``configure(parser)`` adds the
    command's arguments to its ``argparse.ArgumentParser`` and returns the function
    ``run(namespace) -> int`` (the exit status) that executes it. A ``PyramidError`` raised by
    ``run`` is printed as ``pyramid NAME: error: ...`` with exit status 2.
    """
