"""Draft lengths that adapt (docs/algorithms.md, trap 2: a stopping time keeps a chain exact): the adaptive
block-length schedule, the bottom stage's confidence stop, the latency model with realised length
distributions, and ``pyramid check --compare``.

Statistical tests use Markov tables (a context-dependent target), 2500 seeded runs x 4 tokens,
and the joint distribution of tokens 1-2 plus the marginal of token 4 against the target's chain
(``markov_marginal``); a lossless configuration must give p > ALPHA = 1e-4, a negative control
p < REJECT = 1e-6.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from stats import ALPHA, REJECT, chisquare_pvalue, counts, markov_marginal, sample_positions

from pyramid_core import Block, ConfigError, Pipeline, Rng, SamplingConfig, build_pipeline
from pyramid_core.lab.latency.chain import predict_chain
from pyramid_core.lab.latency.forms import expected_tokens
from pyramid_core.lab.measure import length_distributions
from pyramid_core.pipeline import AutoregressiveProposer, SpeculativeProposer, StageVerifier
from pyramid_core.schedule import AdaptiveLength, FixedLength, make_schedule
from pyramid_core.testing import TableModel
from pyramid_core.types import BoundaryStats, StageStats
from pyramid_plugins.exact import ExactPolicy

V = 4
# Markov tables, smallest first: rows differ in confidence (max probability 0.35 .. 0.8), so a
# confidence stop of 0.5 ends blocks after some tokens and not after others.
MARKOV = [
    [[0.80, 0.10, 0.05, 0.05], [0.25, 0.25, 0.25, 0.25], [0.10, 0.60, 0.20, 0.10], [0.35, 0.15, 0.15, 0.35]],
    [[0.55, 0.20, 0.15, 0.10], [0.10, 0.45, 0.25, 0.20], [0.25, 0.45, 0.10, 0.20], [0.20, 0.35, 0.25, 0.20]],
    [[0.40, 0.25, 0.15, 0.20], [0.10, 0.50, 0.30, 0.10], [0.20, 0.10, 0.20, 0.50], [0.30, 0.30, 0.30, 0.10]],
]
PROMPT = [1, 2]
RUNS, LENGTH = 2500, 4


def stages(n: int) -> list[TableModel]:
    return [TableModel((lambda m: lambda ctx: m[ctx[-1]])(t), vocab_size=V, name=f"M{i + 1}")
            for i, t in enumerate(MARKOV[len(MARKOV) - n:])]


def joint12(matrix: Sequence[Sequence[float]]) -> np.ndarray:
    m = np.asarray(matrix)
    return np.array([m[PROMPT[-1], a] * m[a, b] for a, b in itertools.product(range(V), repeat=2)])


def pvalues(samples: np.ndarray, matrix: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(tokens 1-2 jointly, token 4) against the chain of ``matrix``: 2500 draws each."""
    pair = samples[:, 0] * V + samples[:, 1]
    return (chisquare_pvalue(counts(pair, V * V), joint12(matrix)),
            chisquare_pvalue(counts(samples[:, 3], V), markov_marginal(np.asarray(matrix), PROMPT[-1], 4)))


def run(pipe: Pipeline) -> np.ndarray:
    return sample_positions(lambda s: pipe.generate(PROMPT, LENGTH, seed=s).tokens, RUNS, LENGTH)


# --- schedules ---------------------------------------------------------------------------------------


def test_adaptive_schedule_follows_huggingface_heuristic() -> None:
    s = AdaptiveLength(3, maximum=8)
    lengths = []
    for proposed, accepted in [(3, 3), (5, 5), (7, 2), (6, 6), (8, 8), (8, 0), (7, 1)] + [(1, 0)] * 9:
        s.update(proposed, accepted)
        lengths.append(s.length())
    assert lengths == [5, 7, 6, 8, 8, 7, 6, 5, 4, 3, 2, 1, 1, 1, 1, 1]  # +2 / -1 within [1, 8]
    s.update(0, 0)  # nothing proposed: nothing learnt
    assert s.length() == 1
    fixed = FixedLength(4)
    fixed.update(4, 4)
    assert fixed.length() == 4
    with pytest.raises(ConfigError, match=r"unknown length schedule 'heuristic'; valid: fixed, adaptive"):
        make_schedule("heuristic", 3)
    with pytest.raises(ConfigError, match=r"confidence_stop must be in \[0, 1\)"):
        build_pipeline(stages(2), ["exact"], [2], confidence_stop=1.5)


def test_the_schedule_changes_the_block_lengths_a_run_proposes() -> None:
    """The same pipeline with the adaptive schedule proposes blocks of several lengths, up to
    lengths the fixed one never asks for."""
    fixed = build_pipeline(stages(2), ["exact"], [2])
    adaptive = build_pipeline(stages(2), ["exact"], [2], length_schedule="adaptive")
    long = [fixed.generate(PROMPT, 60, seed=1).metrics, adaptive.generate(PROMPT, 60, seed=1).metrics]
    assert len(long[0].boundaries[0].proposed_at) == 2
    assert len(long[1].boundaries[0].proposed_at) > 2  # some block grew beyond 2


# --- exactness (stopping times) -------------------------------------------------------------------

CASES = [
    (2, ["exact"], [2], "adaptive", 0.0),
    (2, ["block"], [2], "adaptive", 0.0),
    (2, ["exact"], [4], "fixed", 0.5),
    (2, ["block"], [4], "fixed", 0.5),
    (3, ["exact", "exact"], [2, 3], "adaptive", 0.5),
    (3, ["block", "exact"], [2, 4], "adaptive", 0.5),
]


@pytest.mark.parametrize(("n", "policies", "ells", "schedule", "stop"), CASES,
                         ids=[f"N{c[0]}-{'+'.join(c[1])}-{c[3]}-stop{c[4]}" for c in CASES])
def test_adaptive_lengths_and_confidence_stops_stay_exact(n: int, policies: list[str], ells: list[int],
                                                          schedule: str, stop: float) -> None:
    """2500 runs x 4 tokens: tokens 1-2 (joint) and token 4 fit the target's chain (ALPHA), and
    the same samples reject the chain of the stage below (1e-6) -- the test has power."""
    pipe = build_pipeline(stages(n), policies, ells, length_schedule=schedule, confidence_stop=stop)
    samples = run(pipe)
    assert min(pvalues(samples, MARKOV[-1])) > ALPHA
    assert pvalues(samples, MARKOV[-2])[0] < REJECT


class DropsUnsureTokens(AutoregressiveProposer):
    """Negative control: decides on the token it just drew (not a stopping time) -- a drafted
    token whose own probability is below 0.3 is dropped and ends the block (docs/algorithms.md, trap 2)."""

    def propose(self, context: torch.Tensor, n: int, rng: Rng) -> Block:
        block = super().propose(context, n, rng)
        probs = block.rows.gather(-1, block.tokens.unsqueeze(-1)).squeeze(-1)
        low = (probs < 0.3).nonzero()
        return block if not low.numel() else block.head(int(low[0, 0]))


def hand_built(bottom_class: type[AutoregressiveProposer], **kw: float) -> Callable[[int], torch.Tensor]:
    """draft -> target with ``bottom_class`` as the draft's proposer, exact, block length 4."""
    draft, target = stages(2)

    def generate(seed: int) -> torch.Tensor:
        bottom = bottom_class(draft, SamplingConfig(), StageStats("draft"), **kw)
        verifier = StageVerifier(target, SamplingConfig(), StageStats("target"))
        top = SpeculativeProposer(bottom, verifier, ExactPolicy(), FixedLength(4), BoundaryStats())
        return top.propose(torch.tensor(PROMPT), LENGTH, Rng(seed)).tokens

    return generate


def test_a_stop_that_looks_at_the_drawn_token_is_detected() -> None:
    """Same sizes: the chain built by hand with the confidence stop passes (ALPHA); with the rule
    that drops the unsure token it just drew it is rejected at 1e-6."""
    good = sample_positions(hand_built(AutoregressiveProposer, confidence_stop=0.5), RUNS, LENGTH)
    assert min(pvalues(good, MARKOV[-1])) > ALPHA
    bad = sample_positions(hand_built(DropsUnsureTokens), RUNS, LENGTH)
    assert pvalues(bad, MARKOV[-1])[0] < REJECT


# --- the latency model with realised lengths ---------------------------------------------------------


def test_a_point_mass_distribution_is_the_fixed_length() -> None:
    costs = [0.002, 0.01]
    for new_tokens in (None, 17):
        a = predict_chain([0.6], [3], costs, new_tokens=new_tokens)
        b = predict_chain([0.6], [{3: 1.0}], costs, new_tokens=new_tokens)
        assert a.time_per_token == pytest.approx(b.time_per_token)
        assert a.tokens_per_target_forward == pytest.approx(b.tokens_per_target_forward)
    mixed = predict_chain([0.6], [{1: 0.5, 5: 0.5}], costs)
    assert mixed.tokens_per_target_forward == pytest.approx(
        1 / (1 / (0.5 * expected_tokens(0.6, 1) + 0.5 * expected_tokens(0.6, 5))))
    with pytest.raises(ConfigError, match="length distribution"):
        predict_chain([0.6], [{-1: 1.0}], costs)


def test_realised_length_distribution_predicts_an_adaptive_run() -> None:
    """Context-free tables: alpha = 1 - TV exactly. 200 generations x 40 tokens with the adaptive
    schedule: the prediction from the realised length distribution is within 6% of the measured
    tokens per target forward; the prediction from the starting length (2) is off by > 15%."""
    draft, target = [0.10, 0.30, 0.20, 0.40], [0.15, 0.35, 0.20, 0.30]
    alpha = 1 - 0.5 * sum(abs(a - b) for a, b in zip(draft, target, strict=True))
    pipe = build_pipeline([TableModel(draft), TableModel(target)], ["exact"], [2], length_schedule="adaptive")
    runs = [pipe.generate([0], 40, seed=s).metrics for s in range(200)]
    tokens = sum(m.new_tokens for m in runs)
    measured = tokens / sum(m.target_forwards for m in runs)
    dist = length_distributions(runs)[0]
    assert len(dist) > 3 and abs(sum(dist.values()) - 1) < 1e-9
    realised = predict_chain([alpha], [dist], [0.0, 1.0], new_tokens=40).tokens_per_target_forward
    start = predict_chain([alpha], [2], [0.0, 1.0], new_tokens=40).tokens_per_target_forward
    assert abs(realised - measured) / measured < 0.06
    assert abs(start - measured) / measured > 0.15


# --- pyramid check --compare -------------------------------------------------------------------------


def test_cli_check_compare(capsys: pytest.CaptureFixture[str]) -> None:
    from pyramid_core.cli import main

    tables = ["--dist", "0.1,0.3,0.2,0.4", "--dist", "0.35,0.1,0.45,0.1", "--dist", "0.4,0.3,0.2,0.1"]
    args = ["check", *tables, "--length", "4", "--length", "4", "--new-tokens", "6", "--samples", "800"]
    assert main([*args, "--compare", "exact,block", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["compare"]
    assert [r["policy"] for r in rows] == ["exact", "block"]
    for r in rows:
        assert len(r["acceptance"]) == 2 and r["p_value"] > ALPHA and r["tokens_per_target_forward"] > 1
    assert main([*args, "--compare", "exact,(fuzzy:div=tv,tau=0.3)"]) == 0
    out = capsys.readouterr().out
    assert "| policy | acceptance 1->2 | acceptance 2->3 | tokens per target forward | TV | chi-square p |" in out
    assert "| fuzzy:div=tv,tau=0.3 |" in out
    assert main([*args, "--compare", "exact,block", "--policy", "exact"]) == 2
    assert "--compare names the policies itself" in capsys.readouterr().err
