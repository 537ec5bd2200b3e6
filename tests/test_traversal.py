"""``traversal``: Traversal Verification of token trees (Weng et al., arXiv 2505.12398).

What is checked, and how:
- an independent numpy reference of the rule (written from the module docstring's formulas,
  sharing no code with ``pyramid_plugins.traversal``) is exact by enumerating every tree a
  proposer can draw -- i.i.d. and without-replacement siblings, depth up to 3, and a shape that
  depends on other branches -- while three plausible mistakes are not;
- the library's verdicts on fixed trees follow the reference's outcome law (chi-square), and on a
  single-path tree coincide with ``block``'s;
- chi-square exactness of pipelines with a ``TreeProposer`` at the bottom (branching (3, 2), with
  and without replacement, a budget tree), 2 and 3 stages with ``exact`` or ``block`` above;
- acceptance: ``traversal`` accepts at least as deep as ``exact``'s top-down tree rule, by
  enumeration and in pipelines; greedy identity; the contract; explicit unit cases.

Statistical conventions (tests/stats.py): seeded runs; p > ALPHA = 1e-4 for a lossless
configuration and p < REJECT = 1e-6 for a wrong one, on the same samples; sizes stated per test.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from stats import ALPHA, REJECT, chisquare_pvalue, counts, markov_marginal, tv

from pyramid_core import Block, Pipeline, Rng, SamplingConfig, Verdict, build_pipeline, make_policy
from pyramid_core.plugins import registries
from pyramid_core.testing import TableModel, check_policy_contract
from pyramid_plugins.block import BlockPolicy
from pyramid_plugins.exact import ExactPolicy
from pyramid_plugins.traversal import TraversalPolicy
from pyramid_plugins.tree import TreeProposer

V = 4

Outcomes = dict[tuple[int, int], float]  # (accepted node, emitted token) -> probability; -1 = the context


# ------------------------------------------------------------------ the reference rules (numpy)
def _normalised(v: np.ndarray) -> np.ndarray:
    s = v.sum()
    return v / s if s > 0 else v


def _children(parents: Sequence[int]) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for i, a in enumerate(parents):
        kids.setdefault(a, []).append(i)
    return kids


def reference_traversal(tokens: Sequence[int], parents: Sequence[int], q: Sequence[np.ndarray], p: Sequence[np.ndarray],
                        without: bool, *, keep_weight: bool = False) -> Outcomes:
    """Exact outcome law of traversal verification of one fixed tree. ``q[i]``: the row node i was
    drawn from; ``p[i + 1]``: the verifier's row after node i, ``p[0]`` at the context. Depth
    first, children in order: child weight min(1, w r(x)/q(x)); after a rejected subtree
    r <- norm(max(w r - q, 0)) and w <- Z/(Z + 1 - w) (1 if 0/0); a node whose children are all
    rejected is kept with probability w and emits y ~ r. ``keep_weight=True`` is a deliberate
    mistake: the residual is updated but the weight is not."""
    kids, out = _children(parents), {}

    def visit(node: int, w: float, r: np.ndarray, reach: float) -> float:
        """Adds the node's accepted outcomes (reached with probability ``reach``); returns the
        probability that the whole subtree is reached and rejected."""
        tried: list[int] = []
        for c in kids.get(node, []):
            x, qc = tokens[c], np.array(q[c], dtype=float)
            if without and tried:
                qc[tried] = 0.0
                qc = _normalised(qc)
            weight = min(1.0, w * r[x] / qc[x]) if qc[x] > 0 else float(w * r[x] > 0)
            reach = visit(c, weight, np.array(p[c + 1], dtype=float), reach)
            excess = np.maximum(w * r - qc, 0.0)
            z = excess.sum()
            if not keep_weight:
                w = z / (z + 1.0 - w) if z + 1.0 - w > 0 else 1.0
            r = excess / z if z > 0 else r
            tried.append(x)
        keep = 1.0 if node < 0 else w
        for y in np.flatnonzero(r > 0):
            out[(node, int(y))] = out.get((node, int(y)), 0.0) + reach * keep * r[y]
        return reach * (1.0 - keep)

    visit(-1, 1.0, np.array(p[0], dtype=float), 1.0)
    return out


def reference_top_down(tokens: Sequence[int], parents: Sequence[int], q: Sequence[np.ndarray], p: Sequence[np.ndarray],
                       without: bool) -> Outcomes:
    """Exact outcome law of the token-level tree rule of ``exact`` (docs/algorithms.md): from the context down, try
    the children in order, accept x w.p. min(1, r(x)/q(x)), else r <- norm(max(r - q, 0)) (and,
    without replacement, q loses x); descend into an accepted child; emit y ~ r when all fail."""
    kids, out = _children(parents), {}

    def visit(node: int, reach: float) -> None:
        r, tried = np.array(p[node + 1], dtype=float), []
        for c in kids.get(node, []):
            x, qc = tokens[c], np.array(q[c], dtype=float)
            if without and tried:
                qc[tried] = 0.0
                qc = _normalised(qc)
            a = min(1.0, r[x] / qc[x]) if qc[x] > 0 else float(r[x] > 0)
            if a > 0:
                visit(c, reach * a)
            reach *= 1.0 - a
            excess = np.maximum(r - qc, 0.0)
            r = _normalised(excess) if excess.sum() > 0 else r
            tried.append(x)
        for y in np.flatnonzero(r > 0):
            out[(node, int(y))] = out.get((node, int(y)), 0.0) + reach * r[y]

    visit(-1, 1.0)
    return out


# A shape rule says how many children each frontier node gets, from everything drawn so far.
Shape = Callable[[list[int], list[int], list[int], int], list[int] | None]


def branching(widths: Sequence[int]) -> Shape:
    """``widths[d]`` children for every node at depth d (the ``TreeProposer`` schedule)."""
    return lambda tokens, parents, frontier, depth: [widths[depth]] * len(frontier) if depth < len(widths) else None


def cross_branch(tokens: list[int], parents: list[int], frontier: list[int], depth: int) -> list[int] | None:
    """Two children at the root; at depth 1 only the sibling with the larger token gets two
    children, at depth 2 only the first node holding the largest token gets one -- a node's
    children count depends on other branches, like a budget tree's."""
    if depth == 0:
        return [2]
    if depth > 2:
        return None
    values = [tokens[f] for f in frontier]
    best = values.index(max(values))
    return [(2 if depth == 1 else 1) if i == best else 0 for i in range(len(frontier))]


def enumerate_trees(draft: np.ndarray, start: int, shape: Shape, without: bool) -> Iterator[tuple[float, list[int], list[int]]]:
    """Every tree the shape rule can grow level by level from the Markov draft table, with its
    probability: children of a node i.i.d. from the draft row after the node's token, or drawn
    sequentially without replacement."""

    def options(row: np.ndarray, k: int) -> list[tuple[tuple[int, ...], float]]:
        if not without:
            return [(seq, float(np.prod(row[list(seq)]))) for seq in itertools.product(range(len(row)), repeat=k)]
        out = []
        for seq in itertools.permutations(range(len(row)), min(k, int((row > 0).sum()))):
            prob, left = 1.0, row.copy()
            for x in seq:
                prob *= left[x] / left.sum()
                left[x] = 0.0
            out.append((seq, prob))
        return out

    def grow(tokens: list[int], parents: list[int], frontier: list[int], depth: int, prob: float) -> Iterator[tuple[float, list[int], list[int]]]:
        widths = shape(tokens, parents, frontier, depth)
        if not widths or sum(widths) == 0:
            yield prob, tokens, parents
            return
        per_node = [options(draft[start if f < 0 else tokens[f]], k) for f, k in zip(frontier, widths, strict=True)]
        for combo in itertools.product(*per_node):
            t, a, new, pr = list(tokens), list(parents), [], prob
            for f, (seq, seq_prob) in zip(frontier, combo, strict=True):
                pr *= seq_prob
                for x in seq:
                    t.append(x)
                    a.append(f)
                    new.append(len(t) - 1)
            if pr > 0:
                yield from grow(t, a, new, depth + 1, pr)

    yield from grow([], [], [-1], 0, 1.0)


def tree_rows(draft: np.ndarray, target: np.ndarray, start: int, tokens: list[int], parents: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    q = [draft[start if a < 0 else tokens[a]] for a in parents]
    return q, [target[start]] + [target[x] for x in tokens]


def path_of(node: int, tokens: list[int], parents: list[int]) -> list[int]:
    out = []
    while node >= 0:
        out.append(tokens[node])
        node = parents[node]
    return out[::-1]


def output_law(rule: Callable[..., Outcomes], draft: np.ndarray, target: np.ndarray, start: int, shape: Shape,
               without: bool, length: int, **kw: Any) -> tuple[np.ndarray, float]:
    """(law of the first ``length`` generated tokens, expected accepted depth): one tree,
    verified by ``rule``, then the target, over every tree the shape can grow."""
    law, depth = np.zeros((len(target),) * length), 0.0
    for prob, tokens, parents in enumerate_trees(draft, start, shape, without):
        q, p = tree_rows(draft, target, start, tokens, parents)
        for (node, y), mass in rule(tokens, parents, q, p, without, **kw).items():
            seq = [*path_of(node, tokens, parents), y]
            depth += prob * mass * (len(seq) - 1)
            stack = [(seq, prob * mass)]
            while stack:
                s, m = stack.pop()
                if len(s) >= length:
                    law[tuple(s[:length])] += m
                    continue
                stack += [([*s, z], m * target[s[-1]][z]) for z in range(len(target)) if target[s[-1]][z] > 0]
    return law.ravel(), depth


def chain_law(target: np.ndarray, start: int, length: int) -> np.ndarray:
    law = np.zeros((len(target),) * length)
    for seq in itertools.product(range(len(target)), repeat=length):
        prev, prob = start, 1.0
        for x in seq:
            prob *= target[prev][x]
            prev = x
        law[seq] = prob
    return law.ravel()


# three-token Markov tables for the enumeration (kept small: every tree is enumerated)
SMALL_DRAFT = np.array([[0.60, 0.30, 0.10], [0.20, 0.20, 0.60], [0.50, 0.10, 0.40]])
SMALL_TARGET = np.array([[0.10, 0.30, 0.60], [0.50, 0.40, 0.10], [0.30, 0.30, 0.40]])
SHAPES = [("chain-3", branching((1, 1, 1))), ("3", branching((3,))), ("2-2", branching((2, 2))),
          ("3-1", branching((3, 1))), ("2-1-2", branching((2, 1, 2))), ("cross-branch", cross_branch)]
_LAWS: dict[tuple[str, str, bool], tuple[np.ndarray, float]] = {}


def small_law(rule: Callable[..., Outcomes], name: str, without: bool) -> tuple[np.ndarray, float]:
    """``output_law`` on the small tables for shape ``name`` over its depth + 1 tokens (cached:
    the exactness and the acceptance tests below share the enumerations)."""
    key = (rule.__name__, name, without)
    if key not in _LAWS:
        length = {"chain-3": 4, "3": 2, "2-1-2": 4, "cross-branch": 4}.get(name, 3)
        _LAWS[key] = output_law(rule, SMALL_DRAFT, SMALL_TARGET, 0, dict(SHAPES)[name], without, length)
    return _LAWS[key]


@pytest.mark.parametrize("without", [False, True], ids=["iid", "without-replacement"])
@pytest.mark.parametrize("name", [s[0] for s in SHAPES])
def test_the_reference_rule_is_exact_by_enumeration(name: str, without: bool) -> None:
    """Every tree the shape can grow, verified by the reference traversal rule and followed by the
    target: the first (depth + 1) tokens have exactly the target chain's law (float64, 1e-12).
    The same holds for the top-down rule (a check of the enumeration itself)."""
    law, _ = small_law(reference_traversal, name, without)
    expected = chain_law(SMALL_TARGET, 0, round(np.log(law.size) / np.log(len(SMALL_TARGET))))
    np.testing.assert_allclose(law, expected, atol=1e-12)
    law, _ = small_law(reference_top_down, name, without)
    np.testing.assert_allclose(law, expected, atol=1e-12)


def test_three_plausible_mistakes_are_lossy_by_enumeration() -> None:
    """Branching (2, 2), the first three tokens: keeping the weight after a rejected subtree moves
    them by TV 0.15 (i.i.d.) / 0.14 (without replacement), verifying i.i.d. children as if drawn
    without replacement by 0.036, and without-replacement children as i.i.d. by 0.015."""
    expected = chain_law(SMALL_TARGET, 0, 3)
    shape = branching((2, 2))
    for drawn_without in (False, True):
        kept, _ = output_law(reference_traversal, SMALL_DRAFT, SMALL_TARGET, 0, shape, drawn_without, 3, keep_weight=True)
        assert tv(kept, expected) > 0.1, drawn_without

    def flipped(tokens: list[int], parents: list[int], q: list[np.ndarray], p: list[np.ndarray], without: bool) -> Outcomes:
        return reference_traversal(tokens, parents, q, p, not without)

    for drawn_without, distance in ((False, 0.03), (True, 0.01)):
        law, _ = output_law(flipped, SMALL_DRAFT, SMALL_TARGET, 0, shape, drawn_without, 3)
        assert tv(law, expected) > distance, drawn_without


@pytest.mark.parametrize("without", [False, True], ids=["iid", "without-replacement"])
def test_traversal_accepts_at_least_as_deep_as_top_down_by_enumeration(without: bool) -> None:
    """Expected accepted depth over every tree of the shape (float64): traversal >= the top-down
    rule for each shape (equal for the depth-1 tree "3"), and more than 0.03 tokens deeper for the
    branching schedules of depth >= 2 (measured gains 0.04-0.12; cross-branch: 0.065 i.i.d.,
    0.005 without replacement)."""
    for name, _ in SHAPES:
        _, deep = small_law(reference_traversal, name, without)
        _, top = small_law(reference_top_down, name, without)
        assert deep >= top - 1e-12, name
        if name == "3":
            assert deep == pytest.approx(top, abs=1e-12)
        elif name != "cross-branch":
            assert deep > top + 0.03, (name, deep, top)


# ------------------------------------------------------------------ the library on fixed trees
PARENTS = [-1, -1, -1, 0, 0, 1, 1, 2, 2]  # branching (3, 2)
FIXED_TREES = {
    # without replacement: distinct siblings
    True: dict(
        tokens=[1, 2, 3, 2, 0, 0, 1, 2, 0],
        root=[0.01, 0.20, 0.35, 0.44],
        kids=[[0.18, 0.31, 0.36, 0.15], [0.73, 0.10, 0.02, 0.15], [0.07, 0.12, 0.67, 0.14]],
        p=[[0.16, 0.06, 0.70, 0.08], [0.24, 0.47, 0.17, 0.12], [0.22, 0.16, 0.19, 0.43], [0.37, 0.53, 0.02, 0.08],
           [0.22, 0.14, 0.01, 0.63], [0.17, 0.26, 0.05, 0.52], [0.39, 0.25, 0.20, 0.16], [0.04, 0.20, 0.05, 0.71],
           [0.06, 0.30, 0.02, 0.62], [0.31, 0.30, 0.09, 0.30]],
    ),
    # i.i.d.: the first two children of the context are the same token (a duplicate)
    False: dict(
        tokens=[1, 1, 3, 0, 3, 0, 0, 0, 3],
        root=[0.04, 0.68, 0.18, 0.10],
        kids=[[0.23, 0.19, 0.09, 0.49], [0.80, 0.03, 0.05, 0.12], [0.39, 0.04, 0.02, 0.55]],
        p=[[0.24, 0.20, 0.25, 0.31], [0.13, 0.42, 0.03, 0.42], [0.28, 0.23, 0.39, 0.10], [0.19, 0.01, 0.10, 0.70],
           [0.22, 0.37, 0.23, 0.18], [0.06, 0.37, 0.11, 0.46], [0.40, 0.01, 0.51, 0.08], [0.01, 0.45, 0.11, 0.43],
           [0.23, 0.38, 0.28, 0.11], [0.01, 0.01, 0.06, 0.92]],
    ),
}


def fixed_tree(without: bool) -> tuple[Block, torch.Tensor, list[np.ndarray], list[np.ndarray]]:
    spec = FIXED_TREES[without]
    q = [np.array(spec["root"])] * 3 + [np.array(r) for r in spec["kids"] for _ in range(2)]
    p = [np.array(r) for r in spec["p"]]
    block = Block(torch.tensor(spec["tokens"]), torch.tensor(np.array(q), dtype=torch.float32),
                  torch.tensor(PARENTS), without_replacement=without)
    return block, torch.tensor(np.array(p), dtype=torch.float32), q, p


def outcome_counts(policy: Any, block: Block, p: torch.Tensor, n: int, seed: int, cells: list[tuple[int, int]]) -> np.ndarray:
    rng = Rng(seed)
    index = {c: i for i, c in enumerate(cells)}
    observed = np.zeros(len(cells))
    for _ in range(n):
        verdict = policy.decide(block, p, rng)
        node = verdict.accepted[-1] if verdict.accepted else -1
        observed[index[(node, verdict.token)]] += 1  # a KeyError would be an impossible outcome
    return observed


@pytest.mark.parametrize("without", [True, False], ids=["without-replacement", "iid-with-duplicates"])
def test_verdicts_on_a_fixed_tree_follow_the_reference_law(without: bool) -> None:
    """A fixed (3, 2) tree over 4 tokens (rows in ``FIXED_TREES``), 5000 decisions: the law of
    (accepted node, emitted token) must fit the reference's (chi-square, ALPHA). Power: the same
    counts reject the reference with the weight kept after a rejection (TV 0.39-0.41), and
    without replacement also the i.i.d. rule (TV 0.41), at 1e-6."""
    block, p, q_np, p_np = fixed_tree(without)
    law = reference_traversal(block.tokens.tolist(), PARENTS, q_np, p_np, without)
    kept = reference_traversal(block.tokens.tolist(), PARENTS, q_np, p_np, without, keep_weight=True)
    alternatives = [kept] + ([reference_traversal(block.tokens.tolist(), PARENTS, q_np, p_np, False)] if without else [])
    cells = sorted(set(law).union(*alternatives))
    observed = outcome_counts(TraversalPolicy(), block, p, 5000, 11 + without, cells)
    assert chisquare_pvalue(observed, [law.get(c, 0.0) for c in cells]) > ALPHA
    for alternative in alternatives:
        assert tv([law.get(c, 0.0) for c in cells], [alternative.get(c, 0.0) for c in cells]) > 0.35
        assert chisquare_pvalue(observed, [alternative.get(c, 0.0) for c in cells]) < REJECT


CHAIN_Q = [[0.40, 0.20, 0.20, 0.20], [0.10, 0.50, 0.20, 0.20], [0.25, 0.25, 0.25, 0.25], [0.30, 0.10, 0.50, 0.10]]
CHAIN_P = [[0.30, 0.30, 0.20, 0.20], [0.30, 0.20, 0.30, 0.20], [0.10, 0.20, 0.30, 0.40], [0.20, 0.10, 0.60, 0.10],
           [0.40, 0.30, 0.20, 0.10]]
CHAIN_TOKENS = [0, 1, 3, 2]


def tokenwise_chain_law(tokens: list[int], q: np.ndarray, p: np.ndarray) -> Outcomes:
    """Token-wise rejection on a fixed chain, in closed form (the power check below)."""
    out: Outcomes = {}
    reach = 1.0
    for i, x in enumerate(tokens):
        a = min(1.0, p[i][x] / q[i][x])
        residual = _normalised(np.maximum(p[i] - q[i], 0.0))
        for y in np.flatnonzero(residual > 0):
            out[(i - 1, int(y))] = reach * (1.0 - a) * residual[y]
        reach *= a
    for y in range(V):
        out[(len(tokens) - 1, y)] = reach * p[len(tokens)][y]
    return out


def test_a_single_path_tree_is_verified_as_block_verifies_the_chain() -> None:
    """The chain ``CHAIN_TOKENS`` once as a tree (parents 0..2, the traversal code path) and once
    as a chain (``block``), 5000 decisions each: both laws of (tau, emitted token) fit the
    reference traversal law on that path (chi-square, ALPHA), and both reject token-wise
    rejection's law (which keeps fewer tokens here) at 1e-6."""
    q, p = np.array(CHAIN_Q), np.array(CHAIN_P)
    parents = [-1, 0, 1, 2]
    law = reference_traversal(CHAIN_TOKENS, parents, list(q), list(p), False)
    tokenwise = tokenwise_chain_law(CHAIN_TOKENS, q, p)
    cells = sorted(set(law) | set(tokenwise))
    rows, verifier = torch.tensor(q, dtype=torch.float32), torch.tensor(p, dtype=torch.float32)
    as_tree = Block(torch.tensor(CHAIN_TOKENS), rows, torch.tensor(parents))
    as_chain = Block(torch.tensor(CHAIN_TOKENS), rows)
    for policy, block in ((TraversalPolicy(), as_tree), (BlockPolicy(), as_chain)):
        observed = outcome_counts(policy, block, verifier, 5000, 3, cells)
        assert chisquare_pvalue(observed, [law.get(c, 0.0) for c in cells]) > ALPHA, type(policy).__name__
        assert chisquare_pvalue(observed, [tokenwise.get(c, 0.0) for c in cells]) < REJECT


def test_chains_are_handed_to_block() -> None:
    """``parents is None``: the very verdicts of ``BlockPolicy`` (same seeds)."""
    block = Block(torch.tensor(CHAIN_TOKENS), torch.tensor(CHAIN_Q))
    p = torch.tensor(CHAIN_P)
    for seed in range(50):
        a, b = TraversalPolicy().decide(block, p, Rng(seed)), BlockPolicy().decide(block, p, Rng(seed))
        assert (a.accepted, a.token) == (b.accepted, b.token) and torch.equal(a.row, b.row)


# ------------------------------------------------------------------ pipelines with token trees
def _rolled(row: Sequence[float]) -> np.ndarray:
    """A Markov table whose row after token a is ``row`` rotated by a (context-dependent)."""
    return np.array([np.roll(row, a) for a in range(V)])


# draft, qualifier, target: the draft is far from the target (TV 0.7 in every context)
ROLLED = [_rolled([0.60, 0.25, 0.10, 0.05]), _rolled([0.30, 0.10, 0.20, 0.40]), _rolled([0.05, 0.10, 0.25, 0.60])]
RUNS, LENGTH = 1500, 3


def markov_stage(rows: np.ndarray, name: str) -> TableModel:
    table = [torch.tensor(r, dtype=torch.float64) for r in rows]
    return TableModel(lambda ctx: table[ctx[-1]], vocab_size=V, name=name)


def tree_samples(bottom: Any, tables: list[np.ndarray], policies: list[Any], lengths: list[int], seed: int,
                 runs: int = RUNS) -> np.ndarray:
    """``Long[ndarray, "runs LENGTH"]``: generations after the prompt [0], one seeded stream."""
    stages = [markov_stage(t, f"stage {i + 2}") for i, t in enumerate(tables[1:])]
    pipe = Pipeline([bottom, *stages], policies, lengths)
    rng = Rng(seed)
    out = np.empty((runs, LENGTH), dtype=np.int64)
    for i in range(runs):
        proposer, _ = pipe.build()
        out[i] = proposer.propose(torch.zeros(1, dtype=torch.long), LENGTH, rng).tokens.tolist()
    return out


def marginal_pvalues(tokens: np.ndarray, target: np.ndarray) -> list[float]:
    """Chi-square p of generated tokens 1..3 against the target's Markov marginal after token 0."""
    return [chisquare_pvalue(counts(tokens[:, s - 1], V), markov_marginal(target, 0, s)) for s in (1, 2, 3)]


TREE_PIPELINES = [
    (2, True, []), (2, False, []), (3, True, ["block"]), (3, False, ["exact"]),
]


@pytest.mark.parametrize(("n_stages", "replacement", "above"), TREE_PIPELINES,
                         ids=["N2-iid", "N2-without", "N3-iid-block-above", "N3-without-exact-above"])
def test_tree_pipelines_are_exact(n_stages: int, replacement: bool, above: list[str]) -> None:
    """A (3, 2) tree of the draft verified by ``traversal`` (by the target, or by a qualifier whose
    chain ``block`` or ``exact`` hands to the target), block length 2 at every boundary: 1500
    generations of 3 tokens; tokens 1, 2, 3 each fit the target's Markov marginal (chi-square,
    ALPHA), and token 1 rejects the marginal of the stage below the target at 1e-6."""
    tables = ROLLED if n_stages == 3 else [ROLLED[0], ROLLED[2]]
    tree = TreeProposer(markov_stage(tables[0], "draft"), (3, 2), replacement=replacement)
    policies = [TraversalPolicy(), *(make_policy(a) for a in above)]
    tokens = tree_samples(tree, tables, policies, [2] * (n_stages - 1), seed=10 * n_stages + replacement)
    assert min(marginal_pvalues(tokens, tables[-1])) > ALPHA
    assert marginal_pvalues(tokens, tables[-2])[0] < REJECT


def test_budget_trees_are_exact() -> None:
    """A budgeted tree (at most 5 nodes, up to 3 children, depth up to 3 -- children counts depend
    on other branches' path probabilities, the case the module's proof does not cover), 2 stages,
    block length 3, 1500 generations: tokens 1-3 fit the target marginal (ALPHA)."""
    tree = TreeProposer(markov_stage(ROLLED[0], "draft"), (3,), replacement=False, budget=5)
    tokens = tree_samples(tree, [ROLLED[0], ROLLED[2]], [TraversalPolicy()], [3], seed=77)
    assert min(marginal_pvalues(tokens, ROLLED[2])) > ALPHA


class MislabelledSequoia:
    """Negative control: children drawn without replacement, but the block claims i.i.d. draws."""

    def __init__(self, inner: TreeProposer) -> None:
        self.inner = inner

    def propose(self, context: torch.Tensor, n: int, rng: Rng) -> Block:
        b = self.inner.propose(context, n, rng)
        return Block(b.tokens, b.rows, b.parents, without_replacement=False)


def test_sequoia_children_verified_as_iid_are_detected() -> None:
    """Same design as ``test_tree_pipelines_are_exact`` (2 stages, 1500 generations): a (3, 2)
    tree drawn without replacement but verified with the i.i.d. rule fails at 1e-6 (tokens 1-3)."""
    tree = MislabelledSequoia(TreeProposer(markov_stage(ROLLED[0], "draft"), (3, 2), replacement=False))
    tokens = tree_samples(tree, [ROLLED[0], ROLLED[2]], [TraversalPolicy()], [2], seed=20)
    assert min(marginal_pvalues(tokens, ROLLED[2])) < REJECT


@pytest.mark.parametrize("replacement", [True, False], ids=["iid", "without"])
def test_traversal_accepts_at_least_as_deep_as_exact_in_pipelines(replacement: bool) -> None:
    """Mean accepted depth per verification of a (3, 2) tree (2 stages, block length 2, 12 seeded
    generations of 120 tokens, ~700-850 rounds per rule, same seeds): traversal's mean may not fall
    below exact's (``decide_tree``) by more than 4 standard errors of the difference."""

    def accepted(policy: Any) -> np.ndarray:
        lengths: list[int] = []
        for seed in range(12):
            tree = TreeProposer(markov_stage(ROLLED[0], "draft"), (3, 2), replacement=replacement)
            pipe = Pipeline([tree, markov_stage(ROLLED[2], "target")], [policy], [2])
            hist = pipe.generate([0], 120, seed=seed).metrics.boundaries[0].accepted_hist
            lengths += [k for k, rounds in enumerate(hist) for _ in range(rounds)]
        return np.array(lengths)

    ours, theirs = accepted(TraversalPolicy()), accepted(ExactPolicy())
    margin = 4 * np.sqrt(ours.var(ddof=1) / ours.size + theirs.var(ddof=1) / theirs.size)
    assert ours.mean() >= theirs.mean() - margin, (ours.mean(), theirs.mean(), margin)


# ------------------------------------------------------------------ greedy
GREEDY = [
    [[0.10, 0.20, 0.20, 0.50], [0.20, 0.50, 0.20, 0.10], [0.10, 0.50, 0.20, 0.20], [0.40, 0.30, 0.20, 0.10]],
    [[0.10, 0.30, 0.20, 0.40], [0.20, 0.50, 0.20, 0.10], [0.20, 0.20, 0.50, 0.10], [0.30, 0.45, 0.15, 0.10]],
    [[0.10, 0.25, 0.20, 0.45], [0.60, 0.20, 0.15, 0.05], [0.30, 0.25, 0.40, 0.05], [0.45, 0.30, 0.10, 0.15]],
]


@pytest.mark.parametrize(("n_stages", "policies"), [(2, ["traversal"]), (3, ["traversal", "block"])])
def test_greedy_tree_decoding_is_the_targets_greedy_path(n_stages: int, policies: list[str]) -> None:
    """Temperature 0, a greedy (3, 2) tree (top-k children with one-hot rows): 30 tokens after
    each of 4 prompts are token for token the target table's argmax path, and tree nodes are both
    accepted and rejected."""
    tables = GREEDY if n_stages == 3 else [GREEDY[0], GREEDY[2]]
    stages = [markov_stage(np.array(t), f"M{i + 1}") for i, t in enumerate(tables)]
    pipe = build_pipeline(stages, policies, [2] + [3] * (n_stages - 2), sampling=SamplingConfig.greedy(),
                          stop_ids=[], tree="tree:branching=3-2")
    accepted = nodes = 0
    for last in range(V):
        gen = pipe.generate([1, last], 30)
        expected, prev = [], last
        for _ in range(30):
            prev = int(np.argmax(tables[-1][prev]))
            expected.append(prev)
        assert gen.token_list == expected
        accepted += gen.metrics.boundaries[0].accepted
        nodes += gen.metrics.boundaries[0].tree_nodes
    assert 0 < accepted < nodes


# ------------------------------------------------------------------ contract, registry, unit cases
def test_traversal_passes_the_policy_contract_with_trees() -> None:
    report = check_policy_contract(TraversalPolicy(), trees=True)
    assert report.decisions == 360
    check_policy_contract("traversal", trees=True, seed=5)


def test_traversal_is_registered_through_its_entry_point() -> None:
    regs = registries()
    assert isinstance(make_policy("traversal"), TraversalPolicy)
    assert regs.policies.get("traversal").plugin == "traversal"


def test_the_emitted_row_is_the_verifiers_row_at_the_emitted_node() -> None:
    """docs/algorithms.md, trap 1 on the fixed trees: ``row`` is p[accepted[-1] + 1] (p[0] for an empty path)."""
    for without in (True, False):
        block, p, _, _ = fixed_tree(without)
        rng = Rng(1)
        for _ in range(200):
            verdict: Verdict = TraversalPolicy().decide(block, p, rng)
            index = verdict.accepted[-1] + 1 if verdict.accepted else 0
            assert torch.equal(verdict.row, p[index])
            assert all(PARENTS[b] == a for a, b in itertools.pairwise((-1, *verdict.accepted)))


def test_an_empty_tree_emits_from_the_context_row() -> None:
    empty = Block(torch.empty(0, dtype=torch.long), torch.empty(0, V), torch.empty(0, dtype=torch.long))
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
    verdict = TraversalPolicy().decide(empty, p, Rng(0))
    assert verdict.accepted == () and verdict.token in (1, 2) and torch.equal(verdict.row, p[0])


def test_mislabelled_and_malformed_blocks_are_refused() -> None:
    rows = torch.full((3, V), 0.25)
    duplicate = Block(torch.tensor([2, 2, 1]), rows, torch.tensor([-1, -1, 0]), without_replacement=True)
    with pytest.raises(ValueError, match=r"'traversal'.*context \(nodes \[0, 1\], tokens \[2, 2\]\).*without replacement"):
        TraversalPolicy().decide(duplicate, torch.full((4, V), 0.25), Rng(0))
    ok = Block(torch.tensor([2, 3, 1]), rows, torch.tensor([-1, -1, 0]), without_replacement=True)
    with pytest.raises(ValueError, match=r"'traversal': a tree of 3 nodes needs 4 verifier rows.*\(3, 4\)"):
        TraversalPolicy().decide(ok, torch.full((3, V), 0.25), Rng(0))
