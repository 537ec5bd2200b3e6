"""The price of a lossy rule (pyramid_core.lab.quality), on explicit tables where it is known.

Tables that do not depend on the context make every emitted token an independent draw from the
rule's next-token distribution r, so the expected excess NLL per token is
sum_x (r(x) - p_T(x)) * -log p(x) and the next-token TV is TV(r, p_T), both computable. A fuzzy
rule with tau = 1 (the TV divergence never exceeds 1) accepts every draft token: r = q for the
first token of a round; at block length 1 every second token is the target's bonus token, so
half the tokens cost the draft's price and half nothing.
Sample sizes: 60 texts x 40 tokens; tolerances are the estimators' own 95% intervals (a miss has
probability 5% per assertion for a correct estimator, and the seeds are fixed).
"""

from __future__ import annotations

import math

import pytest
import torch

from pyramid_core.build import PipelineSpec
from pyramid_core.errors import ConfigError
from pyramid_core.lab.quality import (
    TokenScores,
    excess_price,
    first_token_tv,
    paired_delta,
    score_text,
)
from pyramid_core.testing import TableModel
from pyramid_core.types import SamplingConfig

V = 12
Q = torch.softmax(torch.linspace(2.0, -2.0, V), 0)  # the draft favours low ids
P = torch.softmax(torch.linspace(-1.5, 1.5, V), 0)  # the target high ones
TEXTS, TOKENS = 60, 40


def _texts(policy: str, sampling: SamplingConfig) -> tuple[list, TableModel]:  # type: ignore[type-arg]
    target = TableModel(P.tolist(), name="target")
    pipe = PipelineSpec([TableModel(Q.tolist(), name="draft"), target], [policy], [1], sampling=sampling,
                        stop_ids=()).resolve()
    prompt = [0]
    texts = [pipe.generate(prompt, TOKENS, seed=s).token_list for s in range(TEXTS)]
    return [score_text(target, sampling, prompt, t) for t in texts], target


def _expected_excess(r: torch.Tensor, sampling: SamplingConfig) -> float:
    p_t = sampling.transform(P.log().double().unsqueeze(0))[0]
    return float(((r.double() - p_t) * -P.double().log()).sum())


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=6)])
def test_an_exact_rule_has_no_price_and_a_tight_interval(sampling: SamplingConfig) -> None:
    scores, _ = _texts("exact", sampling)
    price = excess_price(scores)
    assert price.n == TEXTS and price.covers(0.0), price
    assert price.ci95 < 0.05, price  # per-token noise only: 2400 tokens
    assert all(torch.isfinite(s.control).all() for s in scores)  # top-k zeros times -log p: no NaN


def test_a_rule_that_takes_the_draft_costs_what_the_tables_say() -> None:
    sampling = SamplingConfig()
    scores, _ = _texts("fuzzy:div=tv,tau=1.0", sampling)
    price = excess_price(scores)
    expected = 0.5 * _expected_excess(Q, sampling)  # a draft token, then the target's bonus token
    assert expected > 0.5  # the draft's text is much worse under the target
    assert price.covers(expected), (price, expected)
    assert price.ci95 < 0.15, price


def test_the_paired_delta_sees_the_same_price_with_a_wider_interval() -> None:
    sampling = SamplingConfig()
    rule, _ = _texts("fuzzy:div=tv,tau=1.0", sampling)
    ref, _ = _texts("exact", sampling)
    delta, excess = paired_delta(rule, ref), excess_price(rule)
    assert delta.n == TEXTS and delta.covers(0.5 * _expected_excess(Q, sampling)), delta
    assert abs(delta.mean - excess.mean) < delta.ci95 + excess.ci95


def test_the_estimators_arithmetic() -> None:
    a = TokenScores(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]))
    b = TokenScores(torch.tensor([2.0]), torch.tensor([1.0]))
    empty = TokenScores(torch.zeros(0), torch.zeros(0))
    price = excess_price([a, b, empty])
    assert price.n == 2 and price.mean == pytest.approx((2.0 + 1.0) / 3)  # tokens weigh, not texts
    assert math.isnan(excess_price([a]).ci95) and excess_price([]).n == 0
    delta = paired_delta([a, b], [b, a])
    assert delta.mean == pytest.approx(0.0) and delta.n == 2
    assert paired_delta([a, empty], [b, b]).n == 1
    with pytest.raises(ConfigError, match="pairs texts by index: 2 texts against 1"):
        paired_delta([a, b], [a])


def test_next_token_tv_of_an_exact_rule_is_the_sampling_floor_and_of_the_draft_its_tv() -> None:
    stages = [TableModel(Q.tolist(), name="draft"), TableModel(P.tolist(), name="target")]
    prefixes = [[0], [1, 2], [3]]
    exact = first_token_tv(PipelineSpec(stages, ["exact"], [2]).resolve(), prefixes, samples=3000)
    assert exact.prefixes == 3 and exact.support == V
    assert abs(exact.excess) < 0.03, exact
    taken = first_token_tv(PipelineSpec(stages, ["fuzzy:div=tv,tau=1.0"], [2]).resolve(), prefixes, samples=3000)
    assert taken.tv == pytest.approx(0.5 * float((Q - P).abs().sum()), abs=0.03), taken


def test_next_token_tv_refuses_what_has_no_rows() -> None:
    stages = [TableModel(Q.tolist(), name="draft"), TableModel(P.tolist(), name="target")]
    tree = PipelineSpec(stages, ["exact"], [2], tree="tree:branching=2-1").resolve()
    with pytest.raises(ConfigError, match="needs chains of model stages with rows"):
        first_token_tv(tree, [[0]])
    with pytest.raises(ConfigError, match="at least one prefix"):
        first_token_tv(PipelineSpec(stages, ["exact"], [2]).resolve(), [])
