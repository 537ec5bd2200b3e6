"""``SamplingConfig``: validation, and the transform (temperature -> top-k -> top-p, the order
Hugging Face applies them) compared with reference implementations written here in float64."""

from __future__ import annotations

import math

import attrs
import numpy as np
import pytest
import torch

from pyramid_core import SamplingConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, r"SamplingConfig.temperature must be a finite number >= 0, got -0.5"),
        ({"temperature": math.nan}, r"SamplingConfig.temperature must be a finite number >= 0, got nan"),
        ({"temperature": math.inf}, r"SamplingConfig.temperature must be a finite number >= 0, got inf"),
        ({"top_p": 0.0}, r"SamplingConfig.top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"SamplingConfig.top_p must be in \(0, 1\], got 1.5"),
        ({"top_p": -0.1}, r"SamplingConfig.top_p must be in \(0, 1\], got -0.1"),
        ({"top_k": -1}, r"SamplingConfig.top_k must be >= 0 \(0 disables it\), got -1"),
    ],
)
def test_invalid_settings_are_refused_with_the_field_and_value(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_defaults_are_plain_sampling_and_values_are_converted() -> None:
    cfg = SamplingConfig()
    assert (cfg.temperature, cfg.top_k, cfg.top_p) == (1.0, 0, 1.0)
    assert not cfg.is_greedy
    cfg = SamplingConfig(temperature="0.5", top_k="3", top_p="0.9")  # type: ignore[arg-type]
    assert (cfg.temperature, cfg.top_k, cfg.top_p) == (0.5, 3, 0.9)
    assert SamplingConfig.greedy().is_greedy and SamplingConfig(temperature=0).is_greedy
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.temperature = 2.0  # type: ignore[misc]


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 2.0


def test_plain_sampling_is_softmax() -> None:
    logits = random_logits(5, 11, 0)
    out = SamplingConfig().transform(logits)
    assert out.dtype == torch.float32 and out.shape == (5, 11)
    torch.testing.assert_close(out, torch.softmax(logits, -1))


def test_greedy_is_one_hot_at_the_argmax() -> None:
    logits = random_logits(6, 9, 1)
    out = SamplingConfig.greedy().transform(logits)
    expected = torch.zeros(6, 9)
    expected[torch.arange(6), logits.argmax(-1)] = 1.0
    assert torch.equal(out, expected)


def test_greedy_ties_go_to_the_first_index() -> None:
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -3.0, -1.0, -math.inf]])
    out = SamplingConfig.greedy().transform(logits)
    assert out.argmax(-1).tolist() == [1, 0, 0]
    assert out.sum(-1).tolist() == [1.0, 1.0, 1.0]
    assert (out.max(-1).values == 1.0).all()


def test_greedy_ignores_top_k_and_top_p() -> None:
    logits = random_logits(4, 7, 2)
    assert torch.equal(SamplingConfig(temperature=0, top_k=3, top_p=0.5).transform(logits),
                       SamplingConfig.greedy().transform(logits))


@pytest.mark.parametrize("temperature", [0.25, 0.7, 1.0, 1.8, 10.0])
def test_temperature_scales_the_logits(temperature: float) -> None:
    logits = random_logits(8, 13, 3)
    out = SamplingConfig(temperature=temperature).transform(logits)
    torch.testing.assert_close(out, torch.softmax(logits.double() / temperature, -1).float())


@pytest.mark.parametrize("k", [1, 2, 3, 7, 12])
def test_top_k_keeps_exactly_the_k_largest(k: int) -> None:
    logits = random_logits(10, 12, 4)  # continuous values: no ties
    out = SamplingConfig(top_k=k).transform(logits)
    kept = out > 0
    assert kept.sum(-1).tolist() == [k] * 10
    top = logits.topk(k, -1).indices
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, top, True))
    # the kept tokens keep their relative probabilities
    expected = torch.softmax(logits.masked_fill(~kept, -math.inf), -1)
    torch.testing.assert_close(out, expected)


def test_top_k_of_zero_or_at_least_the_vocabulary_and_top_p_of_one_disable_them() -> None:
    logits = random_logits(3, 6, 5)
    for k in (0, 6, 50):
        torch.testing.assert_close(SamplingConfig(top_k=k).transform(logits), torch.softmax(logits, -1))
    torch.testing.assert_close(SamplingConfig(top_p=1.0).transform(logits), torch.softmax(logits, -1))


def reference_top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most probable tokens whose mass is >= top_p; renormalise."""
    out = np.zeros_like(probs)
    for i, row in enumerate(probs):
        order = np.argsort(-row, kind="stable")
        mass, keep = 0.0, []
        for j in order:
            keep.append(j)
            mass += row[j]
            if mass >= top_p:
                break
        out[i, keep] = row[keep] / row[keep].sum()
    return out


def cumulative_masses(probs: np.ndarray) -> np.ndarray:
    return np.cumsum(-np.sort(-probs, axis=-1), axis=-1)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.9, 0.99])
def test_top_p_keeps_the_smallest_prefix_with_mass_at_least_top_p(top_p: float) -> None:
    logits = random_logits(40, 10, 6)
    probs = torch.softmax(logits.double(), -1).numpy()
    # stay away from float32 rounding ties between a cumulative mass and top_p
    margins = np.abs(cumulative_masses(probs) - top_p)
    rows = margins.min(-1) > 1e-4
    assert rows.sum() >= 30
    out = SamplingConfig(top_p=top_p).transform(logits).double().numpy()[rows]
    expected = reference_top_p(probs[rows], top_p)
    np.testing.assert_array_equal(out > 0, expected > 0)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_top_p_always_keeps_the_most_probable_token() -> None:
    logits = torch.tensor([[4.0, 1.0, 0.0, -1.0]])
    out = SamplingConfig(top_p=0.01).transform(logits)
    assert out.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_top_p_worked_example() -> None:
    probs = torch.tensor([[0.30, 0.22, 0.18, 0.14, 0.10, 0.06]])
    out = SamplingConfig(top_p=0.8).transform(probs.log())
    # 0.30 + 0.22 + 0.18 = 0.70 < 0.8, adding 0.14 reaches 0.84 >= 0.8: keep four tokens
    torch.testing.assert_close(out, torch.tensor([[0.30, 0.22, 0.18, 0.14, 0.0, 0.0]]) / 0.84)


@pytest.mark.parametrize(("temperature", "k", "top_p"), [(0.7, 5, 0.8), (1.5, 3, 0.95), (0.4, 0, 0.6), (2.0, 8, 1.0)])
def test_combined_transform_is_temperature_then_top_k_then_top_p(temperature: float, k: int, top_p: float) -> None:
    logits = random_logits(30, 10, 7)
    scaled = logits.double() / temperature
    if k:
        kth = scaled.topk(k, -1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    probs = torch.softmax(scaled, -1).numpy()
    rows = np.abs(cumulative_masses(probs) - top_p).min(-1) > 1e-4
    out = SamplingConfig(temperature=temperature, top_k=k, top_p=top_p).transform(logits).double().numpy()
    expected = reference_top_p(probs, top_p) if top_p < 1.0 else probs
    np.testing.assert_allclose(out[rows], expected[rows], atol=1e-6)


def test_transform_keeps_shape_and_handles_minus_infinity() -> None:
    logits = torch.tensor([[0.0, -math.inf, 1.0, -math.inf]])
    for cfg in (SamplingConfig(), SamplingConfig(temperature=0.5, top_k=3, top_p=0.9), SamplingConfig.greedy()):
        out = cfg.transform(logits)
        assert out.shape == (1, 4)
        assert torch.isfinite(out).all()
        assert out[0, 1] == 0 and out[0, 3] == 0
        assert out.sum().item() == pytest.approx(1.0)
    # a 1-D row works too
    assert SamplingConfig(top_k=1).transform(torch.tensor([0.0, 2.0, 1.0])).tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("temperature", [1e-40, 1e-31, 5e-324])
def test_a_temperature_below_greedy_below_is_greedy(temperature: float) -> None:
    """Before: logits / 1e-40 overflowed float32 to +-inf and softmax gave NaN rows (IndexError in
    the sampler). Below ``GREEDY_BELOW`` a row is the greedy row, ties to the first index."""
    logits = torch.cat([random_logits(4, 9, 5) * 50.0,
                        torch.tensor([[0.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, -math.inf]])])
    cfg = SamplingConfig(temperature=temperature)
    assert cfg.is_greedy and cfg.temperature == temperature
    assert torch.equal(cfg.transform(logits), SamplingConfig.greedy().transform(logits))
    assert torch.equal(cfg.transform(logits.double()), SamplingConfig.greedy().transform(logits.double()))


def test_at_greedy_below_the_temperature_is_applied() -> None:
    """1e-30 is sampled as given: finite rows, and an exact tie keeps half the mass each."""
    from pyramid_core.types import GREEDY_BELOW

    cfg = SamplingConfig(temperature=GREEDY_BELOW)
    assert not cfg.is_greedy
    out = cfg.transform(torch.tensor([[0.0, 2.0, 2.0, 1.0]]))
    assert out.isfinite().all()
    assert out[0].tolist() == [0.0, 0.5, 0.5, 0.0]
