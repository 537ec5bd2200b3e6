"""Fuzzy (FSD) and assisted (PSD_A) policies, divergences and presets.

Statistical tests are seeded; each states its sample size and tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from scipy.spatial import distance

from pyramid_core import ConfigError, Pipeline, PluginError, Rng, SamplingConfig, build_pipeline
from pyramid_core.plugins import registries
from pyramid_core.testing import TableModel
from pyramid_core.testing.exactness import chi_square_p_value, run_check
from pyramid_core.types import Block
from pyramid_plugins.exact import ExactPolicy
from pyramid_plugins.fallback import Fallback
from pyramid_plugins.fuzzy import FuzzyPolicy, js, kl_pq, kl_qp, tv

P = torch.tensor([[0.1, 0.3, 0.6], [0.25, 0.25, 0.5]], dtype=torch.float64)
Q = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]], dtype=torch.float64)


def _block(tokens: list[int], rows: torch.Tensor) -> Block:
    return Block(torch.tensor(tokens), rows.float())


# ---------------------------------------------------------------- divergences against scipy
def test_divergences_match_scipy() -> None:
    for p, q in zip(P.numpy(), Q.numpy()):
        pt, qt = torch.tensor(p)[None], torch.tensor(q)[None]
        assert float(kl_pq(pt, qt)) == pytest.approx(scipy_stats.entropy(p, q), abs=1e-12)
        assert float(kl_qp(pt, qt)) == pytest.approx(scipy_stats.entropy(q, p), abs=1e-12)
        # scipy's jensenshannon is the square root of the JS divergence (natural log by default)
        assert float(js(pt, qt)) == pytest.approx(distance.jensenshannon(p, q) ** 2, abs=1e-12)
        assert float(tv(pt, qt)) == pytest.approx(0.5 * np.abs(p - q).sum(), abs=1e-12)


def test_divergence_edge_cases() -> None:
    p = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    assert float(js(p, q)) == pytest.approx(math.log(2))
    assert float(tv(p, q)) == 1.0
    assert math.isinf(float(kl_pq(p, q))) and math.isinf(float(kl_qp(p, q)))
    assert float(js(p, p)) == 0.0 and float(kl_pq(p, p)) == 0.0


def test_divergences_are_registered_by_the_fuzzy_plugin() -> None:
    regs = registries()
    assert set(regs.divergences.names()) >= {"js", "kl_pq", "kl_qp", "tv"}
    assert {regs.divergences.get(n).plugin for n in ("js", "kl_pq", "kl_qp", "tv")} == {"fuzzy"}


# ---------------------------------------------------------------- fuzzy on explicit vectors
@pytest.mark.parametrize("div", ["js", "kl_pq", "kl_qp", "tv"])
def test_fuzzy_threshold_is_inclusive_and_per_position(div: str) -> None:
    fn = {"js": js, "kl_pq": kl_pq, "kl_qp": kl_qp, "tv": tv}[div]
    d = fn(P.float(), Q.float())  # divergence at positions 0 and 1
    block = _block([2, 1], Q)
    p = torch.cat([P, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)]).float()
    lo, hi = sorted(float(x) for x in d)
    # tau at the larger divergence: both accepted, bonus from p[2] (one-hot at token 2)
    v = FuzzyPolicy(div=div, tau=hi).decide(block, p, Rng(0))
    assert v.accepted == (0, 1) and v.token == 2 and torch.equal(v.row, p[2])
    # tau just below the first position's divergence: nothing accepted, row is p[0]
    first = float(d[0])
    v = FuzzyPolicy(div=div, tau=first * (1 - 1e-4)).decide(block, p, Rng(0))
    assert v.accepted == () and torch.equal(v.row, p[0])
    # tau between: accept exactly the positions up to the first one above tau
    tau = (lo + hi) / 2
    expect = 0 if float(d[0]) > tau else (1 if float(d[1]) > tau else 2)
    assert FuzzyPolicy(div=div, tau=tau).decide(block, p, Rng(0)).n_accepted == expect


def test_fuzzy_rejection_samples_the_full_verifier_row_not_the_residual() -> None:
    """n = 20,000 draws; tolerance: chi-square p > 1e-3 against p, and p < 1e-6 against the
    residual norm(max(p - q, 0)) (which puts zero mass on token 0 here)."""
    p = torch.tensor([[0.3, 0.3, 0.4], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.9, 0.05, 0.05]])
    policy = FuzzyPolicy(div="tv", tau=0.1)  # TV = 0.6 > tau: always rejected
    rng = Rng(1)
    counts = [0, 0, 0]
    for _ in range(20_000):
        v = policy.decide(_block([0], q), p, rng)
        assert v.n_accepted == 0
        counts[v.token] += 1
    assert chi_square_p_value(counts, [0.3, 0.3, 0.4]) > 1e-3
    assert counts[0] > 0  # the residual would never emit token 0


def test_fuzzy_greedy_rows_accept_iff_equal() -> None:
    g = SamplingConfig.greedy()
    p = g.transform(torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    q = g.transform(torch.tensor([[0.0, 5.0, 0.0], [0.0, 1.0, 0.0]]))
    v = FuzzyPolicy(div="js", tau=0.0).decide(Block(torch.tensor([1, 1]), q), p, Rng(0))
    assert v.accepted == (0,) and v.token == 0  # second differs from argmax 0: emit the argmax


def test_fuzzy_rejects_trees_and_nan_divergence() -> None:
    tree = Block(torch.tensor([0, 1]), Q.float(), parents=torch.tensor([-1, -1]))
    with pytest.raises(ValueError, match="fuzzy"):
        FuzzyPolicy().decide(tree, torch.cat([P, P[:1]]).float(), Rng(0))
    nan_div = FuzzyPolicy(div=lambda p, q: torch.full((p.shape[0],), float("nan")), tau=1.0)
    assert nan_div.decide(_block([0], Q[:1]), P.float(), Rng(0)).n_accepted == 0


# ---------------------------------------------------------------- assisted on explicit vectors
def test_assisted_accepts_iff_equal_to_the_verifier_sample() -> None:
    """n = 20,000 single-token blocks; the acceptance frequency of token x must be p(x)
    (binomial 5-sigma tolerance), and the emitted token must be distributed as p."""
    p = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.1, 0.8]])
    rng = Rng(2)
    n, acc, counts = 20_000, 0, [0, 0, 0]
    for _ in range(n):
        v = Fallback().decide(_block([1], q), p, rng)
        acc += v.n_accepted
        counts[1 if v.n_accepted else v.token] += 1
    sigma = math.sqrt(0.5 * 0.5 / n)
    assert abs(acc / n - 0.5) < 5 * sigma
    assert chi_square_p_value(counts, [0.2, 0.5, 0.3]) > 1e-3


def test_assisted_greedy_uses_the_verifier_argmax() -> None:
    g = SamplingConfig.greedy()
    p = g.transform(torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]]))
    q = g.transform(torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    v = Fallback().decide(Block(torch.tensor([1, 1]), q), p, Rng(0))
    assert v.accepted == (0,) and v.token == 0 and torch.equal(v.row, p[1])


def test_assisted_wrapping_a_rule_falls_back_only_where_it_rejects() -> None:
    """With an inner rule that accepts everything (fuzzy tau=inf) nothing falls back."""
    p = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    v = Fallback(FuzzyPolicy(tau=math.inf)).decide(_block([0, 1], q), p, Rng(0))
    assert v.accepted == (0, 1)
    # inner = exact on identical rows accepts all too
    v = Fallback(ExactPolicy()).decide(_block([0, 1], p[:2]), p, Rng(0))
    assert v.accepted == (0, 1)


# ---------------------------------------------------------------- statistical chain tests
TABLES = [[0.5, 0.3, 0.15, 0.05], [0.2, 0.45, 0.25, 0.1], [0.1, 0.3, 0.4, 0.2]]


@pytest.mark.parametrize("lengths", [[1, 1], [2, 3]])
def test_assisted_then_exact_is_an_exact_sample_of_the_target(lengths: list[int]) -> None:
    """3 stages, first token, n = 8,000 samples; pass iff chi-square p > 1e-3 (seeded)."""
    res = run_check(TABLES, [Fallback(), ExactPolicy()], lengths, samples=8000, seed=3)
    assert res.p_value > 1e-3, res
    assert res.tv < 0.03
    assert 0.2 < res.acceptance[0] < 0.8


def test_assisted_then_fuzzy_is_detected_as_lossy() -> None:
    """Negative control: same tables with a loose fuzzy last boundary (accepts the qualifier's
    tokens, TV(p_Q, p_T) = 0.25); n = 8,000; chi-square must reject (p < 1e-6)."""
    res = run_check(TABLES, [Fallback(), FuzzyPolicy(div="js", tau=0.5)], [1, 1], samples=8000, seed=3)
    assert res.p_value < 1e-6
    assert res.tv == pytest.approx(0.25, abs=0.02)


def _markov(rows: list[list[float]], name: str) -> TableModel:
    table = [torch.tensor(r, dtype=torch.float64) for r in rows]
    return TableModel(lambda ctx: table[ctx[-1]], vocab_size=len(rows), name=name)


def test_fuzzy_measured_tv_matches_the_analytic_tv() -> None:
    """2 stages, Markov tables, block length 1, marginal of the 2nd generated token.

    Analytic: at a context whose rows satisfy Div <= tau the draft token x ~ q is accepted and
    the bonus comes from p after x; otherwise y ~ p is emitted and the next round starts.
    n = 10,000 generations; tolerance on |TV_measured - TV_analytic|: 0.02 (the sampling
    error of a TV over 3 categories at this n is about 0.007), and chi-square p > 1e-3 against
    the analytic marginal."""
    q_rows = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]]
    p_rows = [[0.5, 0.35, 0.15], [0.1, 0.2, 0.7], [0.2, 0.4, 0.4]]
    tau = 0.05
    P_ = np.array(p_rows)
    Q_ = np.array(q_rows)
    jsd = [distance.jensenshannon(P_[i], Q_[i]) ** 2 for i in range(3)]
    ok = [d <= tau for d in jsd]
    assert ok.count(True) in (1, 2), jsd  # the test needs both behaviours
    start = 0
    # distribution of (x1, x2)
    joint = np.zeros((3, 3))
    if ok[start]:
        for x1 in range(3):
            joint[x1] += Q_[start, x1] * P_[x1]  # accepted draft token, bonus from p
    else:
        for x1 in range(3):
            nxt = Q_[x1] if ok[x1] else P_[x1]
            joint[x1] += P_[start, x1] * nxt
    analytic2 = joint.sum(0)
    target2 = P_[start] @ P_
    tv_analytic = 0.5 * np.abs(analytic2 - target2).sum()
    assert tv_analytic > 0.03  # a lossy configuration, or the test proves nothing

    pipe = Pipeline([_markov(q_rows, "draft"), _markov(p_rows, "target")], [FuzzyPolicy(div="js", tau=tau)], [1])
    n = 10_000
    counts = np.zeros(3)
    rng = Rng(5)
    prompt = torch.tensor([start])
    for _ in range(n):
        proposer, _ = pipe.build()
        counts[int(proposer.propose(prompt, 2, rng).tokens[1])] += 1
    emp = counts / n
    tv_measured = 0.5 * np.abs(emp - target2).sum()
    assert tv_measured == pytest.approx(tv_analytic, abs=0.02)
    assert chi_square_p_value(counts.astype(int).tolist(), analytic2.tolist()) > 1e-3


def test_greedy_psd_a_with_tau_zero_is_the_target_greedy_output() -> None:
    rng = np.random.default_rng(0)
    rows = [rng.dirichlet(np.ones(6), size=6) for _ in range(3)]
    stages = [_markov(r.tolist(), f"m{i}") for i, r in enumerate(rows)]
    pipe = build_pipeline(stages, ["assisted", "fuzzy:tau=0"], [3, 5], sampling=SamplingConfig.greedy(), stop_ids=[])
    out = pipe.generate([0], 30).token_list
    ref, last = [], 0
    for _ in range(30):
        last = int(np.argmax(rows[2][last]))
        ref.append(last)
    assert out == ref


# ---------------------------------------------------------------- presets and bad parameters
def test_presets_resolve_with_the_paper_defaults() -> None:
    from pyramid_core.build import resolve_preset

    f = resolve_preset("psd-f", 3)
    assert f.policies == ("fuzzy:div=js,tau=0.4", "fuzzy:div=js,tau=0.5") and f.block_lengths == (15, 25)
    a = resolve_preset("psd-a", 3)
    assert a.policies[0] == "assisted" and a.block_lengths == (15, 25)
    assert resolve_preset("sd", 4).policies == ("exact",) * 3
    assert len(resolve_preset("fsd", 2).policies) == 1
    with pytest.raises(ConfigError, match="psd-f.*3 stages, got 2"):
        resolve_preset("psd-f", 2)
    with pytest.raises(PluginError, match="did you mean 'psd-f'"):
        resolve_preset("psd_f", 3)


def test_build_pipeline_with_a_preset() -> None:
    stages = [TableModel(t, name=f"s{i}") for i, t in enumerate(TABLES)]
    pipe = build_pipeline(stages, preset="psd-a")
    assert list(pipe.block_lengths) == [15, 25] and isinstance(pipe.policies[0], Fallback)
    assert list(build_pipeline(stages, preset="psd-a", block_lengths=[2, 3]).block_lengths) == [2, 3]
    with pytest.raises(ConfigError, match="preset .* or policies"):
        build_pipeline(stages, ["exact", "exact"], preset="sd")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fuzzy:tau=-1", r"policy 'fuzzy'.*tau must be a number >= 0, got -1"),
        ("fuzzy:tau=abc", r"policy 'fuzzy': parameter tau='abc' is not a valid"),
        ("fuzzy:div=jsd", r"policy 'fuzzy'.*unknown divergence 'jsd'; did you mean 'js'"),
        ("fuzzy:tua=0.3", r"policy 'fuzzy' has no parameter 'tua'; did you mean 'tau'"),
        ("assisted:inner=exakt", r"unknown policy 'exakt'; did you mean 'exact'"),
        ("fuzzy:tau", r"'fuzzy': parameter 'tau' is not of the form key=value"),
    ],
)
def test_bad_policy_parameters_name_the_policy_and_parameter(spec: str, message: str) -> None:
    with pytest.raises((ConfigError, PluginError), match=message):
        registries().policies.create(spec)


def test_cli_check_reports_distortion_for_each_preset(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from pyramid_core.cli import main

    dists = ["--dist", "0.5,0.3,0.2", "--dist", "0.2,0.5,0.3", "--dist", "0.1,0.3,0.6"]
    results = {}
    for preset in ("sd", "psd-a", "psd-f"):
        assert main(["check", *dists, "--preset", preset, "--samples", "3000", "--json"]) == 0
        results[preset] = json.loads(capsys.readouterr().out)
    assert results["sd"]["p_value"] > 1e-3
    # psd-f accepts the draft token at both boundaries (JS below tau): output ~ the draft table
    assert results["psd-f"]["tv"] == pytest.approx(0.4, abs=0.03)
    assert results["psd-a"]["tv"] == pytest.approx(0.3, abs=0.03)  # ~ the qualifier table
