"""Token trees (docs/algorithms.md "Tree drafting"): the ``tree`` proposer, lossless multi-candidate
verification by ``exact``, trees at any boundary, metrics, the CLI, and HF tree attention.

Statistical conventions (tests/stats.py): every run is seeded; a lossless configuration must pass
a chi-square test at p > ALPHA = 1e-4 and a deliberately wrong one must be rejected at
p < REJECT = 1e-6 by the same test. Sample sizes are stated per test. Pipelines on tables cost
about 1-4 ms per generation here, so the whole file stays well under 2 minutes on 2 cores.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from stats import ALPHA, REJECT, chisquare_pvalue, counts, markov_marginal, tv

from pyramid_core import (
    Block,
    ConfigError,
    Pipeline,
    PluginError,
    Rng,
    SamplingConfig,
    Verdict,
    build_pipeline,
    make_policy,
)
from pyramid_core.testing import TableModel
from pyramid_core.testing.exactness import run_check
from pyramid_core.tree import TokenTree
from pyramid_plugins.exact import ExactPolicy, residual
from pyramid_plugins.fallback import Fallback
from pyramid_plugins.fuzzy import FuzzyPolicy
from pyramid_plugins.tree import TreeProposer

V = 4
# a draft far from the verifier (TV 0.7): single candidates are mostly rejected, trees help a lot
Q0 = [0.6, 0.25, 0.1, 0.05]
P0 = [0.05, 0.1, 0.25, 0.6]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add overhead (and spin on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ closed forms by enumeration
def _norm(v: np.ndarray) -> np.ndarray:
    s = v.sum()
    return v / s if s > 0 else v


def enumerate_node(p: Sequence[float], q: Sequence[float], k: int, drawn_with_replacement: bool,
                   verified_with_replacement: bool | None = None) -> tuple[float, np.ndarray]:
    """Exact (P(some child accepted), distribution of the token the node emits) for one node with
    k children drawn from q (i.i.d., or sequentially without replacement -- then at most |supp q|
    children, as the proposer draws), verified against p with the rule of docs/algorithms.md. An independent
    re-implementation in float64, by enumerating every tuple of children."""
    rule_iid = drawn_with_replacement if verified_with_replacement is None else verified_with_replacement
    p_, q_ = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    out = np.zeros(len(p_))
    accepted = 0.0

    def without(tokens: list[int]) -> np.ndarray:
        return _norm(np.where(np.isin(np.arange(len(q_)), tokens), 0.0, q_))

    def evaluate(children: list[int], prob: float) -> None:
        nonlocal accepted
        r, reach = p_.copy(), 1.0
        for i, x in enumerate(children):
            qi = q_ if rule_iid else without(children[:i])
            a = min(1.0, r[x] / qi[x]) if qi[x] > 0 else float(r[x] > 0)
            out[x] += prob * reach * a
            accepted += prob * reach * a
            reach *= 1.0 - a
            rest = np.maximum(r - qi, 0.0)
            r = rest / rest.sum() if rest.sum() > 0 else r
        out[:] += prob * reach * r

    def draw(prefix: list[int], prob: float) -> None:
        qi = q_ if drawn_with_replacement else without(prefix)
        if len(prefix) == k or qi.sum() == 0:
            evaluate(prefix, prob)
            return
        for x in np.flatnonzero(qi > 0):
            draw([*prefix, int(x)], prob * qi[x])

    draw([], 1.0)
    return accepted, out


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("replacement", [True, False])
def test_the_multi_candidate_rule_is_exact_by_enumeration(k: int, replacement: bool) -> None:
    """The rule of docs/algorithms.md "Tree drafting" emits exactly p at a node, for random
    (p, q) and for the tables used below."""
    gen = np.random.default_rng(k + 10 * replacement)
    pairs = [(P0, Q0), (Q0, P0)] + [(gen.dirichlet(np.ones(V)), gen.dirichlet(np.ones(V))) for _ in range(5)]
    pairs.append(([0.5, 0.5, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]))  # partly disjoint supports
    for p, q in pairs:
        _, out = enumerate_node(p, q, k, replacement)
        np.testing.assert_allclose(out, p, atol=1e-12)


def test_sequoia_children_verified_as_iid_are_lossy_by_enumeration() -> None:
    """The negative control used below really is far from exact: TV 0.32 for k = 3."""
    _, out = enumerate_node(P0, Q0, 3, drawn_with_replacement=False, verified_with_replacement=True)
    assert tv(out, P0) > 0.3


# ------------------------------------------------------------------ one position through the pipeline
K_REPLACEMENT = [(1, True), (2, True), (3, True), (2, False), (3, False)]  # k = 1: both schemes coincide


@pytest.mark.parametrize(("k", "replacement"), K_REPLACEMENT)
def test_acceptance_at_one_position_matches_the_closed_form(k: int, replacement: bool) -> None:
    """2 stages (draft Q0, target P0), block length 1, the first token of 3,000 generations.
    The acceptance rate must pass a two-sided binomial test against the enumerated P(some child
    accepted) at ALPHA, and reject the rate of one candidate fewer at 1e-6 (the closed forms are
    0.30, 0.41 / 0.52, 0.49 / 0.69: >= 0.09 apart, ~10 standard errors at this n). The first
    token must fit P0 (chi-square, ALPHA)."""
    n = 3000
    res = run_check([Q0, P0], [ExactPolicy()], [1], samples=n, seed=k, tree=k, replacement=replacement)
    rate, _ = enumerate_node(P0, Q0, k, replacement)
    successes = round(res.acceptance[0] * n)
    assert scipy_stats.binomtest(successes, n, rate).pvalue > ALPHA
    fewer, _ = enumerate_node(P0, Q0, k - 1, replacement) if k > 1 else (0.0, None)
    if k > 1:
        assert scipy_stats.binomtest(successes, n, fewer).pvalue < REJECT
    assert res.p_value > ALPHA
    assert res.mean_tree_nodes == pytest.approx(k if replacement else min(k, V))


class MislabelledSequoia:
    """Negative control: children drawn without replacement, but the block claims i.i.d. draws,
    so the policy verifies them with the SpecInfer rule."""

    def __init__(self, inner: TreeProposer) -> None:
        self.inner = inner

    def propose(self, context: torch.Tensor, n: int, rng: Rng) -> Block:
        b = self.inner.propose(context, n, rng)
        return Block(b.tokens, b.rows, b.parents, without_replacement=False)


def test_sequoia_children_verified_with_the_iid_rule_are_detected() -> None:
    """Same tables and test as above (k = 3, first token, 2,000 generations): the correct
    Sequoia tree passes (p > ALPHA), the mislabelled one (analytic TV 0.32) fails at 1e-6."""
    n = 2000
    good = _first_tokens(TreeProposer(TableModel(Q0), (3,), replacement=False), [TableModel(P0)], n, seed=4)
    bad = _first_tokens(MislabelledSequoia(TreeProposer(TableModel(Q0), (3,), replacement=False)),
                        [TableModel(P0)], n, seed=4)
    assert chisquare_pvalue(counts(good, V), P0) > ALPHA
    assert chisquare_pvalue(counts(bad, V), P0) < REJECT


class ResidualRowPolicy:
    """Negative control (docs/algorithms.md, trap 1): after rejecting every child of a node, the emitted token
    travels up with the residual it was drawn from instead of the verifier's full row."""

    def decide(self, block: Block, p: torch.Tensor, rng: Rng) -> Verdict:
        verdict = ExactPolicy().decide(block, p, rng)
        assert block.parents is not None
        node = verdict.accepted[-1] if verdict.accepted else -1
        kids = [i for i, a in enumerate(block.parents.tolist()) if a == node]
        if not kids:  # a bonus token: nothing to get wrong
            return verdict
        r, tried = p[node + 1], []
        for c in kids:  # every child of the node was rejected: replay the residuals
            q = block.rows[c].clone()
            if block.without_replacement and tried:
                q[tried] = 0.0
                q = q / q.sum()
            r = residual(r, q)
            tried.append(int(block.tokens[c]))
        return Verdict(verdict.accepted, verdict.token, r)


def _first_tokens(bottom: Any, stages: list[Any], n: int, *, seed: int, policies: Sequence[Any] | None = None,
                  lengths: Sequence[int] | None = None) -> list[int]:
    pipe = Pipeline([bottom, *stages], list(policies or [ExactPolicy()] * len(stages)),
                    list(lengths or [1] * len(stages)))
    rng = Rng(seed)
    out = []
    for _ in range(n):
        proposer, _ = pipe.build()
        out.append(int(proposer.propose(torch.zeros(1, dtype=torch.long), 1, rng).tokens[0]))
    return out


def test_emitting_the_residual_as_the_row_is_detected_three_stages() -> None:
    """3 stages: draft Q0 drafts a tree (k = 2, without replacement) for the qualifier P0; the
    qualifier's chain is verified by the target [0.1, 0.1, 0.1, 0.7]. First token, 2,000
    generations: exact passes at ALPHA; with the residual as the emitted row (TV ~0.14 here) the
    same chi-square test rejects at 1e-6."""
    n, target = 2000, [0.1, 0.1, 0.1, 0.7]

    def run(policy: Any) -> list[int]:
        tree = TreeProposer(TableModel(Q0), (2,), replacement=False)
        return _first_tokens(tree, [TableModel(P0), TableModel(target)], n, seed=9, policies=[policy, ExactPolicy()])

    assert chisquare_pvalue(counts(run(ExactPolicy()), V), target) > ALPHA
    assert chisquare_pvalue(counts(run(ResidualRowPolicy()), V), target) < REJECT


# ------------------------------------------------------------------ Markov tables, depth >= 2
def _rolled(row: Sequence[float]) -> np.ndarray:
    """A Markov table whose row after token a is ``row`` rotated by a (context-dependent)."""
    return np.array([np.roll(row, a) for a in range(V)])


# draft, qualifier, target: the draft's rows are far from the target's (TV 0.7 in every context)
ROLLED = [_rolled(Q0), _rolled([0.3, 0.1, 0.2, 0.4]), _rolled(P0)]
RANDOM = [np.random.default_rng(s).dirichlet(np.full(V, 0.8), size=V) for s in (21, 22, 23)]


def tables_for(family: list[np.ndarray], stages: int) -> list[np.ndarray]:
    """[draft, target] or [draft, qualifier, target] from a family of three tables."""
    return family if stages == 3 else [family[0], family[2]]


def markov_stage(rows: np.ndarray, name: str) -> TableModel:
    table = [torch.tensor(r, dtype=torch.float64) for r in rows]
    return TableModel(lambda ctx: table[ctx[-1]], vocab_size=V, name=name)


def markov_pipeline(tables: list[np.ndarray], bottom: Any) -> Pipeline:
    """``bottom`` (a tree proposer over tables[0]) verified by the other tables, block length 2."""
    stages = [markov_stage(t, f"stage {i + 2}") for i, t in enumerate(tables[1:])]
    return Pipeline([bottom, *stages], [ExactPolicy()] * len(stages), [2] * len(stages))


def _generate(pipe: Pipeline, runs: int, length: int, *, seed: int) -> np.ndarray:
    """``Long[ndarray, "runs length"]``: the first ``length`` tokens of ``runs`` generations after
    the prompt [0], one seeded random stream."""
    rng = Rng(seed)
    out = np.empty((runs, length), dtype=np.int64)
    prompt = torch.zeros(1, dtype=torch.long)
    for i in range(runs):
        proposer, _ = pipe.build()
        out[i] = proposer.propose(prompt, length, rng).tokens.tolist()
    return out


def _p_values(tokens: np.ndarray, target: np.ndarray) -> list[float]:
    """Chi-square p of the 1st, 2nd, 3rd generated token against the target's Markov marginal."""
    return [chisquare_pvalue(counts(tokens[:, s - 1], V), markov_marginal(target, 0, s)) for s in (1, 2, 3)]


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize(("k", "replacement"), K_REPLACEMENT)
def test_tokens_2_and_3_are_exact_with_markov_tables(stages: int, k: int, replacement: bool) -> None:
    """Trees of depth 2 (k candidates per position) on context-dependent tables, block length 2
    at every boundary, 1,500 generations of 3 tokens: tokens 1, 2 and 3 must each fit the
    target's Markov marginal (chi-square, ALPHA). The same test's power: see
    ``test_sequoia_tree_verified_as_iid_is_detected_at_depth_2`` (same tables and n)."""
    tables = tables_for(ROLLED, stages)
    tree = TreeProposer(markov_stage(tables[0], "draft"), (k, k), replacement=replacement)
    tokens = _generate(markov_pipeline(tables, tree), 1500, 3, seed=100 * stages + 10 * k + replacement)
    assert min(_p_values(tokens, tables[-1])) > ALPHA


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize(("k", "replacement"), [(2, True), (3, False)])
def test_tokens_2_and_3_are_exact_with_random_markov_tables(stages: int, k: int, replacement: bool) -> None:
    """As above on random (Dirichlet) tables, 1,500 generations, ALPHA."""
    tables = tables_for(RANDOM, stages)
    tree = TreeProposer(markov_stage(tables[0], "draft"), (k, k), replacement=replacement)
    tokens = _generate(markov_pipeline(tables, tree), 1500, 3, seed=7 + stages + k)
    assert min(_p_values(tokens, tables[-1])) > ALPHA


@pytest.mark.parametrize("stages", [2, 3])
def test_sequoia_tree_verified_as_iid_is_detected_at_depth_2(stages: int) -> None:
    """Negative control for the test above (same tables, n = 1,500, k = 3): Sequoia children
    verified with the i.i.d. rule make tokens 2 and 3 fail the chi-square test at 1e-6."""
    tables = tables_for(ROLLED, stages)
    tree = MislabelledSequoia(TreeProposer(markov_stage(tables[0], "draft"), (3, 3), replacement=False))
    tokens = _generate(markov_pipeline(tables, tree), 1500, 3, seed=5)
    p_values = _p_values(tokens, tables[-1])
    assert p_values[1] < REJECT and p_values[2] < REJECT, p_values


def test_budget_tree_is_exact_with_markov_tables() -> None:
    """A budgeted tree (at most 5 nodes, up to 3 children per node, depth up to the block length
    3), 2 stages, 1,500 generations of 3 tokens: each token fits the target marginal (ALPHA)."""
    draft = TreeProposer(markov_stage(ROLLED[0], "draft"), (3,), replacement=False, budget=5)
    pipe = Pipeline([draft, markov_stage(ROLLED[2], "target")], [ExactPolicy()], [3])
    assert min(_p_values(_generate(pipe, 1500, 3, seed=77), ROLLED[2])) > ALPHA


def test_the_qualifier_verifies_the_tree_and_hands_a_chain_up() -> None:
    """3 stages: only the bottom proposes a tree; the top boundary sees chains (no parents) whose
    rows are the qualifier's distributions."""
    seen: list[Block] = []

    class Spy:
        def decide(self, block: Block, p: torch.Tensor, rng: Rng) -> Verdict:
            seen.append(block)
            return ExactPolicy().decide(block, p, rng)

    draft = TreeProposer(markov_stage(RANDOM[0], "draft"), (2, 2))
    pipe = Pipeline([draft, markov_stage(RANDOM[1], "q"), markov_stage(RANDOM[2], "t")], [ExactPolicy(), Spy()], [2, 3])
    gen = pipe.generate([0], 12, seed=0)
    assert len(gen.token_list) == 12
    assert seen and all(b.parents is None for b in seen)
    assert gen.metrics.boundaries[0].tree_rounds > 0 and gen.metrics.boundaries[1].tree_rounds == 0
    first = seen[0]  # the first chain continues the prompt [0]: rows after [0], [0, x_1], ...
    context = [0]
    for token, row in zip(first.tokens.tolist(), first.rows, strict=True):
        torch.testing.assert_close(row, torch.tensor(RANDOM[1][context[-1]], dtype=torch.float32))
        context.append(token)


# ------------------------------------------------------------------ the policy on explicit trees
def one_hot(i: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(i), V).float()


def tree_block(tokens: list[int], parents: list[int], rows: torch.Tensor, without: bool = False) -> Block:
    return Block(torch.tensor(tokens), rows, torch.tensor(parents), without_replacement=without)


@pytest.mark.parametrize("shared_rows", [False, True])
@pytest.mark.parametrize("without", [False, True])
def test_greedy_trees_accept_the_child_equal_to_the_argmax(shared_rows: bool, without: bool) -> None:
    """One-hot verifier rows. Children rows either one-hot at each child (what the tree proposer
    records for top-k children) or the parent's one-hot argmax row shared by all siblings (so
    q(x) = 0 for every child but the first, and removing it leaves q with zero mass): either way
    exactly the child equal to the verifier's argmax is accepted, else the argmax is emitted."""
    # tree: root children 0: tok 1, 1: tok 2, 2: tok 3; node 1 has children 3: tok 0, 4: tok 2
    tokens, parents = [1, 2, 3, 0, 2], [-1, -1, -1, 1, 1]
    if shared_rows:
        rows = torch.stack([one_hot(1), one_hot(1), one_hot(1), one_hot(0), one_hot(0)])
    else:
        rows = torch.stack([one_hot(t) for t in tokens])
    block = tree_block(tokens, parents, rows, without)
    cases = [  # verifier argmax at the context, after node 1 (token 2), and the expected verdict
        ((2, 2), (1, 4), 0),  # accept node 1, then node 4, bonus = argmax after node 4 (row 5)
        ((2, 0), (1, 3), 0),
        ((2, 1), (1,), 1),  # node 1 accepted, no child equals 1: emit 1 with p[2]
        ((0, 1), (), 0),  # no root child equals 0: emit 0 with p[0]
        ((3, 1), (2,), 0),  # node 2 is a leaf: bonus from p[3]
    ]
    for (root_arg, node1_arg), path, token in cases:
        p = torch.stack([one_hot(root_arg), one_hot(0), one_hot(node1_arg), one_hot(0), one_hot(0), one_hot(0)])
        for seed in range(3):
            verdict = ExactPolicy().decide(block, p, Rng(seed))
            assert verdict.accepted == path
            assert verdict.token == token
            row = (path[-1] + 1) if path else 0
            assert torch.equal(verdict.row, p[row])


def test_all_children_rejected_emits_from_the_residual_with_the_full_row() -> None:
    """Root children 0 and 1 with rows q = [0.5, 0.5, 0, 0]; verifier p = [0, 0, 0.5, 0.5]: both
    are always rejected, the token comes from the residual (tokens 2, 3 only) and the row that
    travels up is p itself (docs/algorithms.md, trap 1)."""
    q = torch.tensor([0.5, 0.5, 0.0, 0.0])
    p = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25] * 4, [0.25] * 4])
    for without in (False, True):
        block = tree_block([0, 1], [-1, -1], q.expand(2, V).clone(), without)
        rng = Rng(0)
        emitted = set()
        for _ in range(200):
            verdict = ExactPolicy().decide(block, p, rng)
            assert verdict.accepted == ()
            assert torch.equal(verdict.row, p[0])
            emitted.add(verdict.token)
        assert emitted == {2, 3}


def test_leaf_bonus_comes_from_the_row_after_the_leaf() -> None:
    """q == p everywhere: everything is accepted down the first path; the bonus row is the
    verifier's row after the leaf (node 2 -> row 3)."""
    rows = torch.full((3, V), 0.25)
    block = tree_block([1, 2, 3], [-1, 0, 1], rows)
    p = torch.stack([torch.full((V,), 0.25)] * 3 + [one_hot(2)])
    verdict = ExactPolicy().decide(block, p, Rng(0))
    assert verdict.accepted == (0, 1, 2) and verdict.token == 2 and torch.equal(verdict.row, p[3])


def test_decide_on_a_tree_does_not_modify_its_inputs() -> None:
    q = torch.tensor(Q0).expand(3, V).clone()
    block = tree_block([0, 0, 1], [-1, -1, 0], q, without=True)
    p = torch.tensor(P0).expand(4, V).clone()
    before = (block.tokens.clone(), q.clone(), p.clone())
    rng = Rng(1)
    for _ in range(50):
        ExactPolicy().decide(block, p, rng)
    assert torch.equal(block.tokens, before[0]) and torch.equal(q, before[1]) and torch.equal(p, before[2])


def test_other_policies_refuse_trees_clearly() -> None:
    block = tree_block([1, 2], [-1, -1], torch.full((2, V), 0.25))
    p = torch.full((3, V), 0.25)
    with pytest.raises(ValueError, match="'fuzzy' verifies chains, not token trees"):
        FuzzyPolicy().decide(block, p, Rng(0))
    with pytest.raises(ValueError, match="'assisted' verifies chains, not token trees"):
        Fallback().decide(block, p, Rng(0))


def test_block_validates_tree_order() -> None:
    with pytest.raises(ValueError, match=r"parents\[1\] = 1.*earlier node"):
        tree_block([1, 2], [-1, 1], torch.full((2, V), 0.25))
    with pytest.raises(ValueError, match=r"parents\[0\] = -2"):
        tree_block([1], [-2], torch.full((1, V), 0.25))
    b = tree_block([1, 2, 3, 0], [-1, -1, 1, 2], torch.full((4, V), 0.25))
    assert b.depth == 3 and not b.without_replacement
    assert Block(torch.tensor([1, 2]), torch.full((2, V), 0.25)).depth == 2


# ------------------------------------------------------------------ the tree proposer
def test_one_score_call_per_depth_and_rows_are_the_draw_rows() -> None:
    stage = markov_stage(RANDOM[0], "draft")
    proposer = TreeProposer(stage, (3, 2, 1))
    before = stage.calls
    block = proposer.propose(torch.tensor([0, 2]), 8, Rng(0))
    assert stage.calls - before == 3  # depths 0, 1, 2 -- the leaves are not scored
    assert proposer.stats.forwards == 3
    assert block.parents is not None and len(block) == 3 + 6 + 6 and block.depth == 3
    parents = block.parents.tolist()
    assert parents[:3] == [-1] * 3 and parents[3:9] == [0, 0, 1, 1, 2, 2] and parents[9:] == list(range(3, 9))
    tokens = block.tokens.tolist()
    for i, parent in enumerate(parents):  # row i = the proposer's row after the parent's path
        last = 2 if parent < 0 else tokens[parent]
        torch.testing.assert_close(block.rows[i], torch.tensor(RANDOM[0][last], dtype=torch.float32))
    assert not block.without_replacement


def test_depth_is_capped_by_the_block_length() -> None:
    proposer = TreeProposer(TableModel(Q0), (2, 2, 2))
    assert proposer.propose(torch.tensor([0]), 2, Rng(0)).depth == 2
    assert len(proposer.propose(torch.tensor([0]), 1, Rng(0))) == 2


def test_without_replacement_children_are_distinct_and_limited_by_the_support() -> None:
    proposer = TreeProposer(TableModel([0.5, 0.3, 0.2, 0.0]), (4, 2), replacement=False)
    rng = Rng(0)
    for _ in range(20):
        block = proposer.propose(torch.tensor([0]), 2, rng)
        assert block.without_replacement and block.parents is not None
        parents = block.parents.tolist()
        for node in [-1, *range(len(block))]:
            kids = [block.tokens[i].item() for i, a in enumerate(parents) if a == node]
            assert len(kids) == len(set(kids))
            assert 3 not in kids
        assert sum(1 for a in parents if a == -1) == 3  # support of size 3 caps 4 children


def test_greedy_children_are_the_top_k_tokens_with_one_hot_rows() -> None:
    proposer = TreeProposer(markov_stage(RANDOM[0], "d"), (3, 2), sampling=SamplingConfig.greedy())
    block = proposer.propose(torch.tensor([1]), 2, Rng(0))
    assert block.parents is not None
    tokens, parents = block.tokens.tolist(), block.parents.tolist()
    assert tokens[:3] == np.argsort(-RANDOM[0][1], kind="stable")[:3].tolist()
    for i, parent in enumerate(parents):
        if parent >= 0:
            assert tokens[i] in np.argsort(-RANDOM[0][tokens[parent]], kind="stable")[:2].tolist()
        assert torch.equal(block.rows[i], one_hot(tokens[i]))


def test_stop_tokens_are_not_expanded() -> None:
    proposer = TreeProposer(TableModel([0.4, 0.3, 0.2, 0.1]), (3, 2), sampling=SamplingConfig.greedy(), stop_ids=[1])
    block = proposer.propose(torch.tensor([0]), 3, Rng(0))
    assert block.parents is not None
    assert block.tokens[:3].tolist() == [0, 1, 2]
    assert 1 not in block.parents.tolist()  # node 1 (the stop token) has no children
    assert len(block) == 3 + 2 + 2


def test_budget_expands_the_most_probable_nodes_first() -> None:
    """Greedy, budget 6, up to 3 children per node: 3 root children, then the remaining 3 nodes
    go to the most probable root child (3 children), none to the others."""
    table = [0.5, 0.3, 0.15, 0.05]
    proposer = TreeProposer(TableModel(table), (3,), sampling=SamplingConfig.greedy(), budget=6)
    block = proposer.propose(torch.tensor([0]), 4, Rng(0))
    assert block.parents is not None
    assert len(block) == 6 and block.parents.tolist() == [-1, -1, -1, 0, 0, 0]
    sampled = TreeProposer(TableModel(table), (2,), budget=7)
    for seed in range(10):
        b = sampled.propose(torch.tensor([0]), 5, Rng(seed))
        assert len(b) <= 7
    with pytest.raises(ValueError, match="budget must be >= 0"):
        TreeProposer(TableModel(table), budget=-1)
    with pytest.raises(ValueError, match="branching"):
        TreeProposer(TableModel(table), branching="4-x")


# ------------------------------------------------------------------ building, metrics, CLI
def test_build_pipeline_wraps_the_bottom_stage_in_a_tree() -> None:
    stages = [TableModel(Q0, name="d"), TableModel([0.25] * 4, name="q"), TableModel(P0, name="t")]
    pipe = build_pipeline(stages, block_lengths=[2, 2], tree="tree:branching=3-2,replacement=false", stop_ids=[])
    bottom = pipe.stages[0]
    assert isinstance(bottom, TreeProposer)
    assert bottom.branching == (3, 2) and not bottom.replacement and bottom.stage is stages[0]
    gen = pipe.generate([0], 10, seed=0)
    assert len(gen.token_list) == 10
    b = gen.metrics.boundaries[0]
    assert b.tree_rounds > 0 and b.tree_nodes >= b.tree_rounds
    d = b.as_dict()
    assert d["mean_tree_nodes"] == pytest.approx(b.tree_nodes / b.tree_rounds)
    assert sum(d["accepted_length_hist"]) == b.rounds  # accepted depth per round
    assert max(i for i, c in enumerate(d["accepted_length_hist"]) if c) <= 2
    assert gen.metrics.boundaries[1].tree_rounds == 0  # the qualifier hands chains up
    assert bottom.stats.forwards > 0
    with pytest.raises(ConfigError, match="wraps the bottom model stage"):
        build_pipeline([TableModel(P0)], tree="tree")
    with pytest.raises(PluginError, match="'tree' is a stage wrapper, not a stage"):
        build_pipeline(["tree:branching=2", TableModel(P0)])
    with pytest.raises(ConfigError, match="branching"):
        build_pipeline(stages[1:], tree="tree:branching=0")


def test_cli_check_tree_reports_gain_and_exactness(capsys: pytest.CaptureFixture[str]) -> None:
    from pyramid_core.cli import main

    args = ["check", "--dist", ",".join(map(str, Q0)), "--dist", "0.25,0.25,0.25,0.25", "--dist", ",".join(map(str, P0)),
            "--length", "2", "--length", "2", "--samples", "400", "--new-tokens", "3", "--tree", "3", "--no-replacement"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tree"] == 3 and out["replacement"] is False and out["new_tokens"] == 3
    assert out["p_value"] > ALPHA and sum(out["counts"]) == 1200
    assert out["acceptance"][0] > out["chain"]["acceptance"][0]
    assert out["tokens_per_target_forward"] >= 1.0
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "tree draft (3 candidates per position, without replacement" in text
    assert "tokens per target forward" in text and "(chain draft:" in text


# ------------------------------------------------------------------ Hugging Face: tree attention
PROMPT = [3, 5, 7, 11, 13, 5, 7]
NEW = 40


def _hf_greedy(model: Any, prompt: list[int], n: int = NEW) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return [int(t) for t in out[0, len(prompt) :]]


def _paths(tokens: list[int], parents: list[int]) -> list[list[int]]:
    paths: list[list[int]] = []
    for i, parent in enumerate(parents):
        paths.append((paths[parent] if parent >= 0 else []) + [tokens[i]])
    return paths


TREE_TOKENS = [1, 2, 3, 4, 5, 6, 7, 7]
TREE_PARENTS = [-1, -1, 0, 0, 1, 2, 2, 3]


def _tree(n: int | None = None) -> Block:
    n = len(TREE_TOKENS) if n is None else n
    return Block(torch.tensor(TREE_TOKENS[:n]), torch.full((n, 64), 1 / 64), torch.tensor(TREE_PARENTS[:n]))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_tree_rows_equal_one_forward_per_path(attn: str, tiny_models: dict[str, Any]) -> None:
    """Row i+1 of a tree score is the logits after context + root-to-node-i path (atol 1e-5),
    under the sdpa and the eager attention implementations; the same holds when the tree is
    scored depth by depth (as the tree proposer does), feeding only the new nodes."""
    from pyramid_core.backends.hf import HFStage
    from pyramid_core.backends.hf.tiny import perturbed

    model = perturbed(tiny_models["target"], seed=5, scale=0.0)  # a private copy to switch attention on
    model.config._attn_implementation = attn
    context = [4, 8, 15, 16]
    expected = torch.stack([HFStage(model).score(torch.tensor(context + path))[0]
                            for path in [[], *_paths(TREE_TOKENS, TREE_PARENTS)]])
    stage = HFStage(model)
    torch.testing.assert_close(stage.score(torch.tensor(context), _tree()), expected, atol=1e-5, rtol=0)
    incremental = HFStage(model)
    incremental.score(torch.tensor(context))
    for n in (2, 5, 8):  # depths 0, 1, 2
        rows = incremental.score(torch.tensor(context), _tree(n))
        torch.testing.assert_close(rows, expected[: n + 1], atol=1e-5, rtol=0)


def _kv(stage: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out: list[tuple[torch.Tensor, torch.Tensor]] = stage.kv_state()
    return out


@pytest.mark.parametrize("path", [[0, 2, 5], [1, 4], [0, 3, 7], []])
def test_hf_cache_after_a_tree_keeps_only_the_accepted_path(path: list[int], tiny_models: dict[str, Any]) -> None:
    """After verifying a tree, the next call's context is context + accepted path + one emitted
    token: the cache must hold exactly that sequence's keys and values at consecutive positions,
    equal to a fresh recompute (atol 1e-5), and its rows must match too."""
    from pyramid_core.backends.hf import HFStage

    model = tiny_models["target"]
    context = [4, 8, 15, 16]
    stage = HFStage(model)
    stage.score(torch.tensor(context), _tree())
    following = context + [TREE_TOKENS[i] for i in path] + [9]
    rows = stage.score(torch.tensor(following), Block(torch.tensor([10, 11]), torch.full((2, 64), 1 / 64)))
    assert stage.cached_tokens == tuple(following + [10, 11])
    fresh = HFStage(model)
    fresh_rows = fresh.score(torch.tensor(following), Block(torch.tensor([10, 11]), torch.full((2, 64), 1 / 64)))
    torch.testing.assert_close(rows, fresh_rows, atol=1e-5, rtol=0)
    mine, ref = _kv(stage), _kv(fresh)
    assert len(mine) == len(ref) > 0
    for (k_a, v_a), (k_b, v_b) in zip(mine, ref, strict=True):
        assert k_a.shape == k_b.shape == (k_b.shape[0], len(following) + 2, k_b.shape[-1])
        torch.testing.assert_close(k_a, k_b, atol=1e-5, rtol=0)
        torch.testing.assert_close(v_a, v_b, atol=1e-5, rtol=0)


def test_hf_tree_nodes_are_never_reused_at_wrong_positions(tiny_models: dict[str, Any]) -> None:
    """Contexts that agree with tree nodes' tokens but not with their positions: a sibling
    token at depth 1 that follows a rejected node, a duplicate token (7 is both node 6 and node 7),
    a context that rolls back below the tree, and a second tree over a shorter context."""
    from pyramid_core.backends.hf import HFStage

    model = tiny_models["target"]
    context = [4, 8, 15, 16]
    for following in ([*context, 2, 3], [*context, 1, 4, 7], [*context, 7], context[:2], [*context, 1, 3, 7, 7, 9]):
        stage = HFStage(model)
        stage.score(torch.tensor(context), _tree())
        rows = stage.score(torch.tensor(following))
        fresh = HFStage(model)
        torch.testing.assert_close(rows, fresh.score(torch.tensor(following)), atol=1e-5, rtol=0)
        for (k_a, v_a), (k_b, v_b) in zip(_kv(stage), _kv(fresh), strict=True):
            torch.testing.assert_close(k_a, k_b, atol=1e-5, rtol=0)
            torch.testing.assert_close(v_a, v_b, atol=1e-5, rtol=0)
    stage = HFStage(model)
    stage.score(torch.tensor(context), _tree())
    rows = stage.score(torch.tensor(context[:3]), _tree(4))
    expected = torch.stack([HFStage(model).score(torch.tensor(context[:3] + p))[0]
                            for p in [[], *_paths(TREE_TOKENS[:4], TREE_PARENTS[:4])]])
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("branching", "replacement"), [((2,), True), ((3, 2), False), ((4, 2, 1), True)])
@pytest.mark.parametrize("stages", [2, 3])
def test_hf_greedy_tree_decoding_is_the_target_greedy_output(
    branching: tuple[int, ...], replacement: bool, stages: int, tiny_models: dict[str, Any]
) -> None:
    """Tiny random Llamas: a greedy tree draft (near model) verified by the target (2 stages) or
    by a qualifier (the target with 2% noise) whose chain the target verifies (3 stages) emits
    exactly the target's greedy ``generate`` tokens (40 new tokens)."""
    from pyramid_core.backends.hf import HFStage
    from pyramid_core.backends.hf.tiny import perturbed

    greedy = SamplingConfig.greedy()
    models = [tiny_models["near"], tiny_models["target"]]
    if stages == 3:
        models.insert(1, perturbed(tiny_models["target"], seed=3, scale=0.02))
    hf = [HFStage(m, name=f"m{i}") for i, m in enumerate(models)]
    pipe = build_pipeline(hf, block_lengths=[len(branching)] + [4] * (stages - 2), sampling=greedy, stop_ids=[],
                          tree=f"tree:branching={'-'.join(map(str, branching))},replacement={replacement}")
    gen = pipe.generate(PROMPT, NEW)
    assert gen.token_list == _hf_greedy(tiny_models["target"], PROMPT)
    b = gen.metrics.boundaries[0]
    assert b.tree_rounds > 0 and b.accepted > 0


def test_hf_sampled_trees_accept_more_than_chains(tiny_models: dict[str, Any]) -> None:
    """Sampling (temperature 1) through HF trees: runs, and a 4-candidate tree accepts more
    positions per round than a chain of the same draft (seeded; 60 tokens)."""
    from pyramid_core.backends.hf import HFStage

    def mean_accepted(branching: str) -> float:
        hf = [HFStage(tiny_models["near"]), HFStage(tiny_models["target"])]
        pipe = build_pipeline(hf, block_lengths=[3], stop_ids=[], tree=f"tree:branching={branching}")
        return float(pipe.generate(PROMPT, 60, seed=0).metrics.boundaries[0].mean_accepted)

    assert mean_accepted("4-4-4") > mean_accepted("1-1-1")


def test_cli_generate_with_a_tree_draft_is_greedy_identical(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """``pyramid generate --tree NAME[:k=v,...]`` wraps the first stage (a 1-layer view of a saved tiny
    Llama) in a tree proposer; ``--compare`` checks the greedy output against HF generate."""
    from pyramid_core.backends.hf.tiny import save_with_words, tiny_llama
    from pyramid_core.cli import main

    path = tmp_path / "tiny-llama"
    save_with_words(tiny_llama(9, num_layers=2), path)
    code = main(["generate", "--prompt", "w3 w5 w7 w11 w13", "--no-chat", "--max-new-tokens", "16", "--compare",
                 "--stage", f"hf:path={path},num_layers=1", "--stage", f"hf:path={path}", "--length", "3",
                 "--tree", "tree:branching=3-2-1,replacement=false"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "greedy output token-identical to HF generate: yes" in out
    assert "token trees:" in out and "stage tree[3-2-1,top-k]" in out  # the drafter counts its own forwards


def test_hf_trees_need_eager_or_sdpa_attention(tiny_models: dict[str, Any]) -> None:
    """Custom 4-D tree masks are refused, naming the stage, where the attention implementation
    would ignore them (or with sliding-window layers)."""
    from pyramid_core.backends.hf import HFStage
    from pyramid_core.backends.hf.tiny import perturbed

    model = perturbed(tiny_models["target"], seed=5, scale=0.0)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="my-target.*'eager' or 'sdpa'.*'flash_attention_2'"):
        HFStage(model, name="my-target").score(torch.tensor([3]), _tree(2))
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 4
    with pytest.raises(ValueError, match="my-target.*sliding window"):
        HFStage(model, name="my-target").score(torch.tensor([3]), _tree(2))


def test_check_refuses_trees_that_would_explode() -> None:
    with pytest.raises(ConfigError, match=r"--tree 3 with block length 15 .*\(at most 4096\)"):
        run_check([Q0, P0], [ExactPolicy()], [15], samples=10, tree=3)
    with pytest.raises(ConfigError, match="at least two stages"):
        run_check([P0], [], [], samples=10, tree=2)


# ------------------------------------------------------------------ EAGLE-2 dynamic trees (beam)
def _path_probability(table: np.ndarray, last: int, tokens: list[int], parents: list[int], node: int) -> float:
    path = []
    while node >= 0:
        path.append(tokens[node])
        node = parents[node]
    p, prev = 1.0, last
    for t in reversed(path):
        p *= float(table[prev][t])
        prev = t
    return p


def test_dynamic_tree_keeps_the_most_probable_nodes_and_grows_deep() -> None:
    """Greedy, beam 3, 3 children per node, budget 8, block length 6, on a Markov table: the tree
    is grown to depth 6 along the 3 best frontier nodes per depth, then reranked: the 8 kept nodes
    form a tree (every parent kept, before its child), none of the dropped nodes is more probable
    than a kept one, and the tree is deeper than the budget tree of the same size."""
    rng = np.random.default_rng(3)
    table = rng.dirichlet(np.full(V, 0.4), size=V)
    stage = markov_stage(table, "draft")
    wide = TreeProposer(stage, (3,), sampling=SamplingConfig.greedy(), beam=3)  # no budget: everything grown
    full = wide.propose(torch.tensor([1, 2]), 6, Rng(0))
    dynamic = TreeProposer(stage, (3,), sampling=SamplingConfig.greedy(), budget=8, beam=3)
    block = dynamic.propose(torch.tensor([1, 2]), 6, Rng(0))
    assert block.parents is not None and full.parents is not None
    tokens, parents = block.tokens.tolist(), block.parents.tolist()
    assert len(tokens) == 8 and all(p < i for i, p in enumerate(parents))
    kept = sorted(_path_probability(table, 2, tokens, parents, i) for i in range(8))
    every = [_path_probability(table, 2, full.tokens.tolist(), full.parents.tolist(), i) for i in range(len(full))]
    assert len(full) > 8 and kept == pytest.approx(sorted(every)[-8:])
    budget = TreeProposer(stage, (3,), sampling=SamplingConfig.greedy(), budget=8).propose(torch.tensor([1, 2]), 6, Rng(0))
    assert TokenTree(block.parents).depth > TokenTree(budget.parents).depth  # type: ignore[arg-type]
    assert "beam=3" in dynamic.name
    with pytest.raises(ValueError, match="beam must be >= 0"):
        TreeProposer(stage, beam=-1)


def test_only_the_expanded_nodes_are_scored() -> None:
    """Beam 2, 4 children per node, 4 deep: each depth's call feeds the stage the nodes expanded so
    far and nothing else (2, 4, 6 nodes: the beam of each depth, every parent before its child),
    each call's subtree extends the one before, and the tree proposed is the one grown from the
    rows of those nodes (every node outside the beam stays a leaf)."""
    rng = np.random.default_rng(5)
    table = rng.dirichlet(np.full(V, 0.4), size=V)
    stage = markov_stage(table, "draft")
    fed: list[Block | None] = []
    score = stage.score

    def recording(context: torch.Tensor, block: Block | None = None) -> torch.Tensor:
        fed.append(block)
        return score(context, block)

    stage.score = recording  # type: ignore[method-assign]
    block = TreeProposer(stage, (4,), sampling=SamplingConfig.greedy(), beam=2).propose(torch.tensor([1, 2]), 4, Rng(0))
    assert fed[0] is None and [len(b) for b in fed[1:] if b is not None] == [2, 4, 6]
    assert block.parents is not None
    tokens, parents = block.tokens.tolist(), block.parents.tolist()
    assert len(tokens) == 4 + 3 * 2 * 4  # 4 children at the root, then 2 expanded nodes x 4 per depth
    expanded = {i for i in range(len(tokens)) if i in parents}
    assert len(expanded) == 6  # the last depth's children are leaves
    paths = {tuple(_path_tokens(tokens, parents, i)) for i in expanded}
    for before, after in zip(fed[1:], fed[2:], strict=False):
        assert before is not None and after is not None
        assert after.tokens[: len(before)].tolist() == before.tokens.tolist()
        assert after.parents[: len(before)].tolist() == before.parents.tolist()  # type: ignore[index]
    last = fed[-1]
    assert last is not None and last.parents is not None
    fed_tokens, fed_parents = last.tokens.tolist(), last.parents.tolist()
    assert {tuple(_path_tokens(fed_tokens, fed_parents, i)) for i in range(len(fed_tokens))} == paths


def _path_tokens(tokens: list[int], parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(tokens[node])
        node = parents[node]
    return path[::-1]


@pytest.mark.parametrize("policy", ["exact", "traversal"])
def test_sampled_dynamic_trees_are_exact(policy: str) -> None:
    """Sampling: a beam-2 tree capped at 5 nodes (which nodes grow depends on their siblings'
    draws, never on their own children), 2 stages, block length 3, 1,500 generations: tokens 1-3
    fit the target marginal (ALPHA) under ``exact`` and ``traversal``."""
    draft = TreeProposer(markov_stage(ROLLED[0], "draft"), (3,), replacement=False, budget=5, beam=2)
    pipe = Pipeline([draft, markov_stage(ROLLED[2], "target")], [make_policy(policy)], [3])
    assert min(_p_values(_generate(pipe, 1500, 3, seed=78), ROLLED[2])) > ALPHA


@pytest.mark.parametrize("policy", ["exact", "traversal"])
def test_greedy_dynamic_trees_emit_the_targets_greedy_path(policy: str, tiny_models: dict[str, Any]) -> None:
    """Tiny random Llamas, temperature 0: a reranked dynamic tree (budget 10, beam 3, 3 children,
    depth up to 5) built from the spec string and verified in one forward by ``policy`` emits the
    target's greedy ``generate`` tokens, and accepts more than one token per round."""
    from pyramid_core.backends.hf import HFStage

    hf = [HFStage(tiny_models["near"], name="d"), HFStage(tiny_models["target"], name="t")]
    pipe = build_pipeline(hf, [policy], [5], sampling=SamplingConfig.greedy(), stop_ids=[],
                          tree="tree:branching=3,budget=10,beam=3")
    gen = pipe.generate(PROMPT, NEW)
    assert gen.token_list == _hf_greedy(tiny_models["target"], PROMPT)
    b = gen.metrics.boundaries[0]
    assert b.tree_rounds > 0 and b.accepted / b.tree_rounds > 1.0
