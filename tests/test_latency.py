"""The latency model (docs/algorithms.md "Latency model"): closed forms, limits, and a Monte-Carlo check of
expected tokens per verification on a pipeline with known per-token acceptance."""

from __future__ import annotations

import math

import pytest
import torch

from pyramid_core.errors import ConfigError
from pyramid_core.lab.latency.chain import predict_chain
from pyramid_core.lab.latency.forms import (
    expected_tokens,
    pair_speedup,
    polybasic_time,
    psd_throughput,
    sd_throughput,
)
from pyramid_core.lab.measure import measure_alpha, measure_forward_time
from pyramid_core.pipeline import Pipeline
from pyramid_core.testing import TableModel
from pyramid_plugins.exact import ExactPolicy


def test_expected_tokens_hand_values_and_limits() -> None:
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25
    assert expected_tokens(0.8, 4) == pytest.approx(1 + 0.8 + 0.64 + 0.512 + 0.4096)
    for gamma in (0, 1, 3, 7):
        assert expected_tokens(0.0, gamma) == 1.0
        assert expected_tokens(1.0, gamma) == gamma + 1
        assert expected_tokens(1e-9, gamma) == pytest.approx(1.0, abs=1e-8)
        assert expected_tokens(1 - 1e-9, gamma) == pytest.approx(gamma + 1, rel=1e-6)
    with pytest.raises(ConfigError, match="alpha"):
        expected_tokens(1.5, 3)
    with pytest.raises(ConfigError, match="gamma"):
        expected_tokens(0.5, -1)


def test_pair_and_pyramid_throughputs() -> None:
    assert pair_speedup(0.5, 2, 0.1) == pytest.approx(1.75 / 1.2)
    assert pair_speedup(0.0, 3, 0.0) == 1.0  # a free draft that is always wrong changes nothing
    assert sd_throughput(1.0, 4, 100.0, 10.0) == pytest.approx(5 / (0.04 + 0.1))
    v_fsd = sd_throughput(0.8, 2, 200.0, 50.0)
    assert psd_throughput(0.8, 2, 0.6, 5, 200.0, 50.0, 10.0) == pytest.approx(0.6 * 6 / (5 / v_fsd + 0.1))
    # T = (N/L1) T1 + (N/L2) T2 + beta (N/L2) T3 for N = 12 tokens
    assert polybasic_time([1.0, 2.0, 10.0], [3.0, 4.0], 12, beta=0.5) == pytest.approx(4 + 6 + 15)
    with pytest.raises(ConfigError, match="accepted lengths"):
        polybasic_time([1.0, 2.0], [1.0, 2.0], 4)


def test_predict_chain_hand_computed_three_stages() -> None:
    pred = predict_chain([0.5, 0.5], [1, 2], [1.0, 2.0, 10.0])
    # tau_1 = 1; E_2 = 1.5, tau_2 = (1 + 2) / 1.5 = 2; E_3 = 1.75, tau_3 = (2 * 2 + 10) / 1.75 = 8
    assert pred.time_per_token == pytest.approx(8.0)
    assert pred.speedup == pytest.approx(10 / 8)
    assert pred.tokens_per_target_forward == pytest.approx(1.75)
    assert pred.forwards_per_token == pytest.approx((2 / 1.5 / 1.75, 2 / 1.5 / 1.75, 1 / 1.75))
    # two stages reduce to Leviathan et al.'s speedup; one stage is the target alone
    assert predict_chain([0.7], [3], [0.2, 1.0]).speedup == pytest.approx(pair_speedup(0.7, 3, 0.2))
    assert predict_chain([], [], [0.05]).speedup == pytest.approx(1.0)


def test_finite_horizon_limits() -> None:
    # alpha = 1: every round emits ell + 1 tokens, except that the budget cuts the last one
    exact = predict_chain([1.0], [4], [0.0, 1.0], new_tokens=10)  # rounds: 5, 5 (asks 4 + bonus)
    assert exact.tokens_per_target_forward == pytest.approx(5.0)
    # alpha = 0: one token per target forward whatever the block length
    assert predict_chain([0.0], [4], [0.1, 1.0], new_tokens=7).tokens_per_target_forward == pytest.approx(1.0)
    # long generations approach the steady state
    steady = predict_chain([0.6, 0.8], [3, 5], [0.01, 0.1, 1.0])
    long = predict_chain([0.6, 0.8], [3, 5], [0.01, 0.1, 1.0], new_tokens=3000)
    assert long.tokens_per_target_forward == pytest.approx(steady.tokens_per_target_forward, rel=0.01)
    # ... but a middle stage asked for ell tokens discards its last round's surplus, which the
    # steady state ignores: the finite horizon is a few per cent slower
    assert steady.time_per_token < long.time_per_token < 1.05 * steady.time_per_token


# p (target) and q (draft) with TV(p, q) = 0.3: every drafted token is accepted with alpha = 0.7
P_TARGET = [0.5, 0.3, 0.2]
Q_DRAFT = [0.2, 0.3, 0.5]
ALPHA = 1 - 0.5 * sum(abs(a - b) for a, b in zip(P_TARGET, Q_DRAFT))
NEW_TOKENS = 3000  # per block length; about NEW_TOKENS / E(alpha, gamma) verification rounds


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_monte_carlo_tokens_per_target_forward(gamma: int) -> None:
    """Sample size: one generation of 3000 tokens per gamma (1000 to 1850 rounds), seeded.
    Tolerance: 4 standard errors of the per-round mean, from the truncated geometric variance."""
    assert pytest.approx(0.7) == ALPHA
    pipe = Pipeline([TableModel(Q_DRAFT, name="draft"), TableModel(P_TARGET, name="target")],
                    [ExactPolicy()], [gamma])
    m = pipe.generate(torch.tensor([0]), NEW_TOKENS, seed=1234 + gamma).metrics
    e = expected_tokens(ALPHA, gamma)
    pmf = [ALPHA**j * (1 - ALPHA) for j in range(gamma)] + [ALPHA**gamma]
    var = sum(p * (j + 1) ** 2 for j, p in enumerate(pmf)) - e**2
    rounds = m.target_forwards
    tolerance = 4 * math.sqrt(var / rounds)
    assert m.tokens_per_target_forward == pytest.approx(e, abs=tolerance)
    # alpha recovered from the counters, and the finite-horizon prediction of the same run
    (alpha_hat,) = measure_alpha(m)
    assert alpha_hat == pytest.approx(ALPHA, abs=0.03)
    pred = predict_chain([ALPHA], [gamma], measure_forward_time(m), new_tokens=NEW_TOKENS)
    assert pred.tokens_per_target_forward == pytest.approx(m.tokens_per_target_forward, abs=tolerance)

