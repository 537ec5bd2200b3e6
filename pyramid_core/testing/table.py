"""``TableModel``: a stage whose next-token distribution is given explicitly.

It runs through exactly the same pipeline code as a Hugging Face stage (it implements the
``Stage`` protocol), so exactness can be checked against distributions known in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pyramid_core.errors import ConfigError
from pyramid_core.tree import TokenTree
from pyramid_core.types import Block

__all__ = ["TableModel", "validate_distribution"]

Distribution = Sequence[float] | Tensor


def validate_distribution(dist: Distribution, *, name: str, atol: float = 1e-6) -> Tensor:
    """Check a probability vector and return it as float64; errors name ``name``."""
    t = torch.as_tensor(dist, dtype=torch.float64)
    if t.dim() != 1 or t.numel() == 0:
        raise ConfigError(f"{name}: a distribution must be a non-empty 1-D vector, got shape {tuple(t.shape)}")
    if torch.isnan(t).any():
        raise ConfigError(f"{name}: distribution contains NaN at index {int(torch.isnan(t).nonzero()[0, 0])}")
    if torch.isinf(t).any():
        raise ConfigError(f"{name}: distribution contains an infinite value at index {int(torch.isinf(t).nonzero()[0, 0])}")
    if (t < 0).any():
        i = int((t < 0).nonzero()[0, 0])
        raise ConfigError(f"{name}: probabilities must be >= 0, got {float(t[i])} at index {i}")
    total = float(t.sum())
    if not math.isclose(total, 1.0, abs_tol=atol):
        raise ConfigError(f"{name}: probabilities must sum to 1, got {total:.6g}")
    return t


class TableModel:
    """A ``Stage`` with explicit next-token probabilities.

    ``table`` is a fixed probability vector (the same distribution after any context), a
    ``vocab x vocab`` matrix (row t is the distribution after a context ending in token t: rows
    then differ by position, deterministically), or a function ``context -> vector`` where
    ``context`` is a tuple of token ids (prompt included). Function results are validated and
    cached per context.
    """

    def __init__(
        self,
        table: Distribution | Sequence[Sequence[float]] | Callable[[tuple[int, ...]], Distribution],
        *,
        vocab_size: int | None = None,
        name: str = "table",
        device: torch.device | str = "cpu",
    ) -> None:
        self.name = name
        self.device = torch.device(device)
        self._fn: Callable[[tuple[int, ...]], Distribution] | None = None
        self._cache: dict[tuple[int, ...], Tensor] = {}
        self._by_last: Tensor | None = None  # log rows by last token (a vocab x vocab table)
        self.calls = 0
        if callable(table):
            self._fn = table
            if vocab_size is None:
                raise ConfigError(f"{name}: a context-dependent table needs vocab_size")
            self.vocab_size = int(vocab_size)
            self._fixed: Tensor | None = None
        elif torch.as_tensor(table).dim() == 2:
            matrix = torch.as_tensor(table, dtype=torch.float64)
            if matrix.shape[0] != matrix.shape[1]:
                raise ConfigError(f"{name}: a table by last token must be vocab x vocab (row t after token t), "
                                  f"got shape {tuple(matrix.shape)}")
            rows = [validate_distribution(r, name=f"{name} row {t} (after token {t})") for t, r in enumerate(matrix)]
            self.vocab_size = len(rows)
            if vocab_size is not None and vocab_size != self.vocab_size:
                raise ConfigError(f"{name}: vocab_size={vocab_size} but the table has {self.vocab_size} rows")
            self._fixed = None
            self._by_last = torch.stack(rows).float().log().to(self.device)
        else:
            probs = validate_distribution(table, name=name)  # type: ignore[arg-type]  # 1-D here
            self.vocab_size = probs.numel()
            if vocab_size is not None and vocab_size != self.vocab_size:
                raise ConfigError(f"{name}: vocab_size={vocab_size} but the table has {self.vocab_size} entries")
            self._fixed = probs.float().log().to(self.device)

    def _log_row(self, ctx: tuple[int, ...]) -> Tensor:
        row = self._cache.get(ctx)
        if row is None:
            assert self._fn is not None
            probs = validate_distribution(self._fn(ctx), name=f"{self.name} after context {ctx[-8:]}")
            if probs.numel() != self.vocab_size:
                raise ConfigError(f"{self.name}: table after context {ctx[-8:]} has {probs.numel()} entries, expected {self.vocab_size}")
            row = probs.float().log().to(self.device)
            self._cache[ctx] = row
        return row

    def score(self, context: Tensor, block: Block | None = None) -> Tensor:
        """Log-probabilities as logits, ``Float[Tensor, "n+1 vocab"]`` (row convention of
        ``pyramid_core.protocols``)."""
        self.calls += 1
        n = 0 if block is None else len(block)
        if self._fixed is not None:
            return self._fixed.expand(n + 1, -1)
        if self._by_last is not None:  # row i follows the context's last token, then node i-1's token
            last = context[-1:] if block is None else torch.cat([context[-1:], block.tokens.to(context.device)])
            return self._by_last[last.to(self.device)]
        base = tuple(int(t) for t in context.tolist())
        if block is None or n == 0:
            return self._log_row(base).unsqueeze(0)
        tokens = [int(t) for t in block.tokens.tolist()]
        tree = TokenTree.chain(n) if block.tree is None else block.tree
        paths = [tuple(tokens[j] for j in tree.path(i)) for i in range(n)]
        return torch.stack([self._log_row(base)] + [self._log_row(base + path) for path in paths])

    def reset(self) -> None:
        """Nothing is cached across contexts except pure table lookups."""
