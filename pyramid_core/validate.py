"""Checks at the edges of the pipeline: block lengths that can take effect, prompts, the context
limit, the logits a stage returns and the verdicts a policy returns -- each error names the
culprit and what would be valid.

Block lengths ([what enters the
recursion](../../algorithms.md#what-enters-the-recursion-is-checked)): stage k+1 is asked for at
most ell_{k+1} tokens per round of stage k+2, and asks stage k for min(ell_k, tokens still needed)
tokens, so a lower length larger than the one above it can never take effect. Lengths must be
non-decreasing from the bottom boundary to the top one (``check_block_lengths``); the pipeline, the
latency model and the planner share this rule.

Logits (``score_checked``): one reduction per forward and one host read -- the sum of all logits
is finite iff none is NaN or infinite. Only when it is not are the rows looked at one by one: a
row is bad if it holds NaN or +inf, or no finite logit at all (-inf entries alone are legitimate:
tokens with zero probability, as ``TableModel`` gives for zeros in its table). On CUDA the read
waits for the forward, which the pipeline waits for right after anyway (the verifier's timing
sync, the proposer's sampled token), so it moves that wait earlier rather than adding one.

Verdicts (``check_verdict``, every round; the conformance kit's contract check calls the same
function): host-side checks only, O(accepted) -- the accepted indices, the emitted token's id, the
row's width. The emitted token's mass in the returned row needs one element of the row: on the
CPU it is read at once; on an accelerator ``EmittedMass`` keeps a copy of that element on the
device and reads all of them with one host read at the end of the generation (or when the
generation fails), so no round waits for the device more than it already does.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

import attrs
import torch
from torch import Tensor

from pyramid_core.errors import (
    ConfigError,
    NonFiniteError,
    NonFiniteWarning,
    PolicyOutputError,
    StageOutputError,
)
from pyramid_core.protocols import HasContextLength, Stage
from pyramid_core.types import Block, Verdict

__all__ = [
    "EmittedMass",
    "NONFINITE_MODES",
    "NonFiniteMode",
    "check_block_lengths",
    "check_fits",
    "check_nonfinite_mode",
    "check_prompt",
    "context_length",
    "check_verdict",
    "policy_label",
    "effective_block_lengths",
    "score_checked",
]

NonFiniteMode = Literal["raise", "warn"]
NONFINITE_MODES: tuple[str, ...] = ("raise", "warn")


def _lengths_text(lengths: Sequence[int]) -> str:
    return ",".join(str(ell) for ell in lengths)


def effective_block_lengths(lengths: Sequence[int]) -> list[int]:
    """The lengths that would run: each one capped by every length above it."""
    out = list(lengths)
    for k in range(len(out) - 2, -1, -1):
        out[k] = min(out[k], out[k + 1])
    return out


def check_block_lengths(lengths: Sequence[object]) -> list[int]:
    """``lengths`` (one per boundary, bottom first) as ints, each >= 1 and none larger than the
    length of the boundary above it (module docstring); a ``ConfigError`` otherwise."""
    for k, ell in enumerate(lengths):
        if isinstance(ell, bool) or not isinstance(ell, int) or ell < 1:
            raise ConfigError(f"block length at boundary {k + 1} -> {k + 2} must be an integer >= 1, got {ell!r}")
    ells = [int(ell) for ell in lengths]  # type: ignore[call-overload]
    for k in range(len(ells) - 1):
        if ells[k] > ells[k + 1]:
            runs = effective_block_lengths(ells)
            raise ConfigError(
                f"block lengths {_lengths_text(ells)}: the length {ells[k]} at boundary {k + 1} -> {k + 2} cannot "
                f"take effect: stage {k + 2} is asked for at most {ells[k + 1]} token(s) per round (the length at "
                f"boundary {k + 2} -> {k + 3}), so it never asks stage {k + 1} for more. Lengths must not decrease "
                f"from the bottom boundary up: use {_lengths_text(runs)} (what would run) or raise the length above "
                f"to at least {ells[k]}"
            )
    return ells


def check_nonfinite_mode(mode: object) -> NonFiniteMode:
    if mode == "raise":
        return "raise"
    if mode == "warn":
        return "warn"
    raise ConfigError(f"on_nonfinite must be one of {', '.join(NONFINITE_MODES)}, got {mode!r}")


def context_length(stage: object) -> int | None:
    """The longest context ``stage`` can score (``HasContextLength``), or ``None``: no known limit."""
    limit = stage.context_length if isinstance(stage, HasContextLength) else None
    return None if limit is None else int(limit)


def check_fits(name: str, limit: int | None, tokens: int, what: str, fix: Callable[[int], str]) -> None:
    """Refuse ``tokens`` positions in stage ``name`` of context length ``limit`` (``None``: no
    limit) when they do not fit: ``what`` says where they come from (e.g. "the prompt (2 tokens)
    + max_new_tokens (600)"), ``fix(limit)`` what would fit."""
    if limit is not None and tokens > limit:
        raise ConfigError(f"{what} = {tokens} tokens do not fit stage {name!r}, whose context length is "
                          f"{limit} tokens; {fix(limit)}")


def check_prompt(prompt: Tensor | Sequence[int], vocab_size: int) -> Tensor:
    """The prompt as a 1-D ``torch.long`` tensor (on the CPU when given as a list): integer
    token ids in [0, vocab_size), at least one. Errors name the offending id and position."""
    if isinstance(prompt, Tensor):
        tensor = prompt
    else:
        items = list(prompt)
        for i, item in enumerate(items):
            if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                what = "a nested sequence" if isinstance(item, (list, tuple, Tensor)) else repr(item)
                raise ConfigError(
                    f"the prompt must be a flat sequence of integer token ids; position {i} holds {what} "
                    f"({type(item).__name__})"
                )
        tensor = torch.tensor([int(item) for item in items], dtype=torch.long)
    if tensor.dim() != 1:
        raise ConfigError(
            f"the prompt must be one sequence of token ids (a 1-D tensor), got shape {tuple(tensor.shape)}; "
            "generate one prompt per call"
        )
    if tensor.dtype == torch.bool or tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        raise ConfigError(f"the prompt must hold integer token ids, got dtype {tensor.dtype}")
    if tensor.numel() == 0:
        raise ConfigError("the prompt is empty: give at least one token (e.g. a BOS token)")
    tensor = tensor.long()
    bad = ((tensor < 0) | (tensor >= vocab_size)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ConfigError(
            f"the prompt holds token id {int(tensor[i])} at position {i}, outside the vocabulary "
            f"(valid ids: 0 .. {vocab_size - 1})"
        )
    return tensor


def _where(context_len: int, block: Block | None, row: int, rows: int) -> str:
    """Which position row ``row`` of a forward over ``context + block`` predicts."""
    if block is None or block.tree is None:
        return (f"position {context_len + row} (row {row} of the {rows} rows of this forward: the next-token "
                f"distribution after {context_len + row} tokens)")
    if row == 0:
        return (f"position {context_len} (row 0 of the {rows} rows of this tree forward: the distribution "
                f"after the {context_len}-token context)")
    depth = block.tree.depths[row - 1]  # the node sits at position context_len + depth
    return (f"position {context_len + depth + 1} (row {row} of the {rows} rows of this tree "
            f"forward: the distribution after tree node {row - 1}, at depth {depth} "
            f"(0 = a child of the context))")


def _nonfinite(logits: Tensor, finite: Tensor, stage: str, context_len: int, block: Block | None,
               mode: NonFiniteMode) -> Tensor:
    """The slow path of ``score_checked``: name the first bad row, then raise or warn."""
    rows = logits.shape[0]
    row = int((~finite).nonzero()[0, 0])
    values = logits[row]
    bad = (values.isnan() | values.isposinf()).nonzero()
    if bad.numel():
        column = int(bad[0, 0])
        what = f"the logit {float(values[column])} for token id {column}"
    else:
        what = "no finite logit (every entry is -inf)"
    count = int((~finite).sum())
    more = f"; {count} of its rows are bad" if count > 1 else ""
    if mode == "raise" or not bad.numel():
        raise NonFiniteError(f"stage {stage!r} returned {what} at {_where(context_len, block, row, rows)}{more}"
                             + ("; pass on_nonfinite='warn' (--nonfinite warn) to give NaN and +inf entries zero "
                                "probability and continue" if bad.numel() else ""))
    cleaned = logits.masked_fill(logits.isnan() | logits.isposinf(), -torch.inf)
    empty = ~(cleaned.amax(-1) > -torch.inf)
    if bool(empty.any()):
        row = int(empty.nonzero()[0, 0])
        raise NonFiniteError(f"stage {stage!r} returned no finite logit at {_where(context_len, block, row, rows)} "
                             "(nothing is left to sample after dropping its NaN and +inf entries)")
    # no position in the text: Python shows a warning once per distinct message, so once per
    # stage and broken token, not once per forward
    warnings.warn(NonFiniteWarning(f"stage {stage!r} returned {what}; NaN and +inf entries get zero "
                                   "probability (on_nonfinite='warn')"), stacklevel=3)
    return cleaned


def score_checked(stage: Stage, context: Tensor, block: Block | None, *, name: str,
                  mode: NonFiniteMode = "raise") -> Tensor:
    """``stage.score(context, block)``, checked where the rows enter the pipeline: the shape
    ``(n+1, vocab_size)`` and finite rows (module docstring). ``mode="warn"`` warns instead and
    gives non-finite entries zero probability (-inf logits); a row with nothing left still raises.
    An exception from inside the forward is re-raised unchanged, with a note naming the stage."""
    try:
        logits = stage.score(context, block)
    except Exception as exc:
        note = (f"raised by stage {name!r} while scoring a context of {len(context)} tokens"
                + (f" and a block of {len(block)}" if block is not None else ""))
        if sys.version_info >= (3, 11):
            exc.add_note(note)
        else:  # the same attribute; Python 3.10's tracebacks do not print it
            with contextlib.suppress(AttributeError, TypeError):
                exc.__notes__ = [*getattr(exc, "__notes__", ()), note]
        raise
    rows = 1 if block is None else len(block) + 1
    if logits.dim() != 2 or logits.shape[0] != rows or logits.shape[1] != stage.vocab_size:
        raise StageOutputError(
            f"stage {name!r} returned logits of shape {tuple(logits.shape)}; expected ({rows}, {stage.vocab_size}): "
            f"one row per position scored ({'the context' if block is None else f'a block of {len(block)} + 1'}) "
            f"and one column per token of its vocabulary (vocab_size {stage.vocab_size})"
        )
    if math.isfinite(float(logits.sum())):  # the one reduction and host read per forward
        return logits
    finite = ~(logits.isnan() | logits.isposinf()).any(-1) & (logits.amax(-1) > -torch.inf)
    if bool(finite.all()):  # only -inf entries: zero-probability tokens
        return logits
    return _nonfinite(logits, finite, name, len(context), block, mode)


def policy_label(policy: object) -> str:
    """A name for messages: a spec string, the policy's ``name`` attribute, or its repr (its
    class name when the repr is the default ``<... at 0x...>``)."""
    if isinstance(policy, str):
        return repr(policy)
    name = getattr(policy, "name", None)
    if isinstance(name, str) and name:
        return name
    text = repr(policy)
    return type(policy).__qualname__ if text.startswith("<") else text


def _bad_verdict(rule: str, detail: str, policy: str, boundary: str) -> PolicyOutputError:
    where = f" at boundary {boundary}" if boundary else ""
    return PolicyOutputError(f"policy {policy}{where} returned {detail}", rule, detail)


def check_verdict(verdict: object, block: Block, vocab: int, *, policy: str,
                  boundary: str = "") -> tuple[tuple[int, ...], int]:
    """``(accepted, token)`` of a policy's verdict on ``block``, as Python ints, after the
    host-side rules of the acceptance-policy contract (``pyramid_core.testing.contract``):

    ``verdict``      it is a ``Verdict``;
    ``prefix``       for a chain of n tokens, ``accepted`` is ``(0, 1, ..., j-1)``, 0 <= j <= n;
    ``tree-path``    for a tree, ``accepted`` is a root-to-node path (``block.tree.parents``);
    ``token-range``  the emitted token is an integer id in ``[0, vocab)``;
    ``row``          ``row`` is a 1-D tensor of ``vocab`` entries.

    O(len(accepted)), no device access. A violation raises ``PolicyOutputError`` naming
    ``policy`` (a label, see ``policy_label``), the ``boundary`` (``"k -> k+1"``; empty offline),
    what was returned and what would be valid; its ``rule`` and ``detail`` name the rule."""
    if not isinstance(verdict, Verdict):
        raise _bad_verdict("verdict", f"{type(verdict).__name__} ({verdict!r:.80}) from decide(), not a "
                           "pyramid_core.Verdict(accepted, token, row)", policy, boundary)
    n = len(block)
    try:
        accepted = tuple(operator.index(a) for a in verdict.accepted)
    except TypeError:
        raise _bad_verdict("prefix", f"accepted={verdict.accepted!r:.80}, not a sequence of integer indices into "
                           f"the block of {n} tokens", policy, boundary) from None
    tree = block.tree
    if tree is None:
        if len(accepted) > n or accepted != tuple(range(len(accepted))):
            raise _bad_verdict("prefix", f"accepted={accepted} for a chain of {n} tokens; it must be (0, 1, ..., j-1) "
                               f"for some 0 <= j <= {n} -- a policy accepts a prefix and emits one token after it",
                               policy, boundary)
    else:
        parents = tree.parents
        previous = -1
        for a in accepted:
            if not 0 <= a < n or parents[a] != previous:
                below = "the context" if previous < 0 else f"node {previous}"
                raise _bad_verdict("tree-path", f"accepted={accepted}, not a root-to-node path of the tree with "
                                   f"parents {list(parents)}: node {a} does not hang below {below}",
                                   policy, boundary)
            previous = a
    try:
        token = operator.index(verdict.token)
    except TypeError:
        raise _bad_verdict("token-range", f"token={verdict.token!r:.80}, not an integer token id in [0, {vocab})",
                           policy, boundary) from None
    if not 0 <= token < vocab:
        raise _bad_verdict("token-range", f"token={token}, outside the vocabulary [0, {vocab})", policy, boundary)
    row = verdict.row
    if not isinstance(row, Tensor) or row.dim() != 1 or row.shape[0] != vocab:
        shape = f"shape {tuple(row.shape)}" if isinstance(row, Tensor) else type(row).__name__
        raise _bad_verdict("row", f"a row of {shape}; the row must be a Float[Tensor, 'vocab'] of size {vocab}: the "
                           "verifier's full row at the emitted position", policy, boundary)
    return accepted, token


def _no_mass(token: int, mass: float, policy: str, boundary: str) -> PolicyOutputError:
    return _bad_verdict("token-mass", f"token={token}, which has probability {mass:g} in the row it returned; "
                        "the emitted token must be one the verifier can produce (a draw from that row, or from "
                        "the residual at a rejection)", policy, boundary)


@attrs.define(eq=False)
class EmittedMass:
    """Checks that each emitted token has positive mass in the row its verdict returns
    (rule ``token-mass``). A row on the CPU is checked at once; on an accelerator the element
    is kept on the device and ``flush()`` checks them all with one host read (module
    docstring). ``defer`` forces either behaviour (``None``: by the row's device)."""

    defer: bool | None = None
    _masses: list[Tensor] = attrs.field(init=False, factory=list)
    _who: list[tuple[int, str, str]] = attrs.field(init=False, factory=list)

    def check(self, row: Tensor, token: int, *, policy: str, boundary: str) -> None:
        if not (not row.is_cpu if self.defer is None else self.defer):
            mass = float(row[token])  # ~2 us: the one tensor read of the check
            if not mass > 0:
                raise _no_mass(token, mass, policy, boundary)
            return
        self._masses.append(row[token].detach().clone())  # not a view: the round's rows can be freed
        self._who.append((token, policy, boundary))

    def flush(self) -> None:
        """Check what ``check`` deferred (one host read) and forget it."""
        if not self._masses:
            return
        masses = torch.stack([m.to(self._masses[0].device) for m in self._masses]).float()
        who, self._masses, self._who = self._who, [], []
        bad = ~(masses > 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            token, policy, boundary = who[i]
            raise _no_mass(token, float(masses[i]), policy, boundary)
