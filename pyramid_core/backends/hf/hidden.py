"""The hidden states an ``HFStage`` keeps for a feature-reading draft
([feature-level drafts](../../algorithms.md#feature-level-drafts)).

With features enabled the stage asks its forwards -- the ones it runs anyway -- for their hidden
states and keeps the chosen layers' states of every fed position in a track of its
``StageCache``: rolled back with the KV cache, and gathered with it when a token tree is
compacted. ``FeatureLayers`` says which layers are kept and how they are read.

Layer numbering: ``-1`` is the final-normed state the LM head reads (EAGLE-1's feature); ``i`` in
``0 .. L-2`` is the output of decoder layer i (EAGLE-3 fuses a low, a middle and a high one).
Hugging Face returns ``L + 1`` hidden states -- the embeddings, the outputs of layers 0 .. L-2,
then the normed output of the last layer -- so the last layer's output exists only normed, as
``-1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["FeatureLayers", "check_feature_layers"]


def check_feature_layers(layers: tuple[int, ...], num_layers: int, stage: str) -> tuple[int, ...]:
    """``layers`` as a tuple of valid, distinct layer numbers of a model with ``num_layers``
    decoder layers (``ValueError`` naming the stage and the valid numbers otherwise)."""
    layers = tuple(int(i) for i in layers)
    valid = f"-1 (the final-normed state) or 0..{num_layers - 2} (a decoder layer's output)"
    for i in layers:
        if i != -1 and not 0 <= i <= num_layers - 2:
            last = f"; layer {num_layers - 1}'s output exists only normed, as -1" if i == num_layers - 1 else ""
            raise ValueError(f"stage {stage!r} has no feature layer {i}: valid are {valid}{last}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"stage {stage!r}: feature layers must be distinct, got {list(layers)}")
    return layers


class FeatureLayers:
    """The layers a stage keeps features of (``()``: none) and how they are stacked and read."""

    def __init__(self, num_layers: int, stage: str) -> None:
        self.num_layers, self.stage = num_layers, stage
        self.layers: tuple[int, ...] = ()
        self._index: list[int] = []  # positions in Hugging Face's hidden-state tuple

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    def set_layers(self, layers: tuple[int, ...]) -> bool:
        """Keep ``layers`` from now on; whether that changed anything."""
        layers = check_feature_layers(layers, self.num_layers, self.stage)
        if layers == self.layers:
            return False
        self.layers = layers
        self._index = [self.num_layers if i == -1 else i + 1 for i in layers]
        return True

    def stack(self, hidden_states: tuple[Tensor, ...]) -> Tensor:
        """``Float[Tensor, "fed layers hidden"]``: the kept layers of every position a forward fed."""
        return torch.stack([hidden_states[i][0] for i in self._index], dim=1)

    def select(self, kept: Tensor, layers: tuple[int, ...]) -> Tensor:
        """``Float[Tensor, "m width"]`` from kept features ``Float[Tensor, "m kept hidden"]``:
        ``layers`` (kept ones) in this order, concatenated."""
        if tuple(layers) != self.layers:
            try:
                pick = [self.layers.index(i) for i in layers]
            except ValueError:
                raise ValueError(f"stage {self.stage!r} keeps feature layers {list(self.layers)}, "
                                 f"not {list(layers)}") from None
            kept = kept[:, pick]
        return kept.reshape(kept.shape[0], -1)
