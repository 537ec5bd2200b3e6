"""One seeded random stream per run, with a torch.Generator per device it is used on."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from pyramid_core.errors import ConfigError

__all__ = ["Rng", "SEED_LIMIT", "check_seed", "seed_range"]

#: Seeds are integers in [0, SEED_LIMIT): ``torch.Generator.manual_seed`` takes unsigned 64-bit
#: values, and ``Rng`` adds a small offset per device, so the top half is kept free.
SEED_LIMIT = 2**63


def check_seed(value: object, name: str = "seed", limit: int = SEED_LIMIT) -> int:
    """``value`` as an int in [0, limit) -- an integer, not a bool or a float (``1.5`` is not
    seed 1) -- else a ``ConfigError`` naming ``name``, the value and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < limit:
        kind = f" ({type(value).__name__})" if isinstance(value, (bool, float, str)) else ""
        raise ConfigError(f"{name} must be an integer in {seed_range(limit)}, got {value!r}{kind}")
    return int(value)


def seed_range(limit: int = SEED_LIMIT) -> str:
    """``"[0, 2**63)"``: the seeds below ``limit``, as messages write them."""
    power = limit.bit_length() - 1
    return f"[0, 2**{power})" if limit == 2**power else f"[0, {limit})"


class Rng:
    """Seeded randomness for a run. Every random draw of a pipeline goes through this object,
    so a seed makes a run reproducible on a given machine. ``seed``: an int in [0, 2**63)
    (``check_seed``), or ``None`` for a fresh random one."""

    def __init__(self, seed: int | None = None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = check_seed(seed)
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
