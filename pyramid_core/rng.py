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
        """One draw from ``Float[Tensor, "vocab"]`` (need not be normalised)."""
        return int(torch.multinomial(probs, 1, generator=self.generator(probs.device)).item())

    def categorical_many(self, probs: Tensor) -> Tensor:
        """One draw per row of ``Float[Tensor, "n vocab"]`` -> ``Long[Tensor, "n"]``."""
        gen = self.generator(probs.device)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
