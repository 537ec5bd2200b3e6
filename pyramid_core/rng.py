"""One seeded random stream per run, with a torch.Generator per device it is used on."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Rng"]


class Rng:
    """Seeded randomness for a run. Every random draw of a pipeline goes through this object,
    so a seed makes a run reproducible on a given machine."""

    def __init__(self, seed: int | None = None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            # distinct but deterministic stream per device
            gen.manual_seed(self.seed + 7919 * len(self._generators))
            self._generators[device] = gen
        return gen

    def uniform(self, n: int, device: torch.device) -> Tensor:
        """``Float[Tensor, "n"]`` i.i.d. U[0, 1)."""
        return torch.rand(n, generator=self.generator(device), device=device)

    def categorical(self, probs: Tensor) -> int:
        """One draw from ``Float[Tensor, "vocab"]`` (need not be normalised).

        Inverse-CDF sampling: one uniform per draw and no per-call setup, which is much faster
        than ``torch.multinomial`` on CPU for large vocabularies."""
        cdf = probs.cumsum(-1)
        u = torch.rand(1, generator=self.generator(probs.device), device=probs.device, dtype=cdf.dtype)
        index = int(torch.searchsorted(cdf, u * cdf[-1], right=True).item())
        if index >= probs.shape[-1]:  # u * total rounded up to total: take the last token with mass
            index = int((probs > 0).nonzero()[-1, 0].item())
        return index

    def categorical_rows(self, probs: Tensor) -> Tensor:
        """One independent draw per row of ``Float[Tensor, "n vocab"]`` -> ``Long[Tensor, "n"]``."""
        cdf = probs.cumsum(-1)
        u = torch.rand(probs.shape[0], 1, generator=self.generator(probs.device), device=probs.device, dtype=cdf.dtype)
        index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
        over = index >= probs.shape[-1]
        if bool(over.any()):  # rounding put u * total at the total: last token with mass
            last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)
            index = torch.where(over, last, index)
        return index
