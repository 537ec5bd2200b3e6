"""Greedy identity within a dtype: a lossless row's greedy text against the target's, where a
difference is either a real one or a numerical tie.

A verification forward feeds M tokens at once; decoding feeds one. The kernels round those two
differently, so the same position's logits differ by a few units in the last place of the dtype
(measured on SmolLM2-135M, docs/compile.md: up to 6e-5 in float32 and 0.5 in bfloat16, whose
8-bit mantissa leaves logits of magnitude 20 an ulp of 0.125). Where the target's two best
tokens are closer than that, a lossless pipeline may take the other one, and the texts part
there -- the same thing HF's assisted generation does in bfloat16, and no fault of the rule.

``first_divergence`` finds where a row's text leaves the reference and measures the reference's
margin there (the target's logit of its own token minus that of the row's token, one forward of
the target after the common prefix). A divergence whose margin is within ``tie_tolerance`` of the
dtype is a tie; any other is a real mismatch, which the bench reports as a failure. Only the
first divergence of a prompt is checked: after it the contexts differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from pyramid_core.protocols import Stage

__all__ = ["Divergence", "first_divergence", "tie_tolerance", "TIE_TOLERANCE"]

TIE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-9, torch.bfloat16: 0.5, torch.float16: 0.125}
"""Logit margins (nats) below which a divergence is a numerical tie, per dtype (module docstring)."""


def tie_tolerance(dtype: torch.dtype) -> float:
    return TIE_TOLERANCE.get(dtype, TIE_TOLERANCE[torch.float32])


@attrs.frozen
class Divergence:
    """Where a text left the reference: ``position`` (new tokens in), the reference's ``margin``
    there (nats; ``inf``: one text ended, not a token choice), and whether it is a ``tie``."""

    position: int
    margin: float
    tie: bool


@torch.inference_mode()
def first_divergence(target: Stage, prompt: Sequence[int], reference: Sequence[int], output: Sequence[int],
                     dtype: torch.dtype | None = None) -> Divergence | None:
    """``None`` if ``output == reference``, else the first divergence (module docstring);
    ``dtype``: the target's (its ``dtype`` attribute when not given)."""
    ref, out = list(reference), list(output)
    if ref == out:
        return None
    p = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), min(len(ref), len(out)))
    if p >= len(ref) or p >= len(out):  # one stopped where the other went on
        return Divergence(p, float("inf"), False)
    context = torch.tensor([*prompt, *ref[:p]], dtype=torch.long)
    row = target.score(context)[0].float()
    margin = float(row[ref[p]] - row[out[p]])
    kind: torch.dtype = dtype or getattr(target, "dtype", None) or torch.float32
    return Divergence(p, margin, abs(margin) <= tie_tolerance(kind))
