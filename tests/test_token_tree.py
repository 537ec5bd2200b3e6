"""``pyramid_core.tree``: the ``TokenTree`` value (depths, children, paths, ancestor mask,
``follow``, validation) on hand-written trees, ``without`` on explicit rows, and a property test
over random valid parents vectors (hypothesis, as the ``ci`` profile of tests/test_properties.py:
derandomised, 100 examples)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyramid_core import Block
from pyramid_core.tree import TokenTree, without

CHAIN = (-1, 0, 1, 2)
STAR = (-1, -1, -1, -1)
# branching 4-2-1 under depth 3, flattened level by level as TreeProposer does
BRANCHING = (-1, -1, -1, -1, 0, 0, 1, 1, 2, 2, 3, 3, *range(4, 12))


def test_chain() -> None:
    tree = TokenTree.from_parents(CHAIN)
    assert tree.parents == CHAIN and tree.depths == (0, 1, 2, 3) and tree.depth == 4
    assert tree.roots == (0,) and tree.children == ((1,), (2,), (3,), ())
    assert tree.path(3) == (0, 1, 2, 3) and tree.path(0) == (0,) and tree.path(-1) == ()
    assert torch.equal(tree.ancestor_mask(), torch.ones(4, 4, dtype=torch.bool).tril())
    assert TokenTree.chain(4) == tree and len(tree) == 4


def test_star() -> None:
    tree = TokenTree.from_parents(torch.tensor(STAR))
    assert tree.depths == (0, 0, 0, 0) and tree.depth == 1
    assert tree.roots == (0, 1, 2, 3) and tree.children == ((), (), (), ())
    assert tree.children_of(-1) == tree.roots and tree.path(2) == (2,)
    assert torch.equal(tree.ancestor_mask(), torch.eye(4, dtype=torch.bool))


def test_branching_4_2_1() -> None:
    tree = TokenTree.from_parents(BRANCHING)
    assert len(tree) == 4 + 8 + 8 and tree.depth == 3
    assert tree.depths == (0,) * 4 + (1,) * 8 + (2,) * 8
    assert tree.roots == (0, 1, 2, 3)
    assert tree.children[0] == (4, 5) and tree.children[3] == (10, 11)
    assert tree.children[11] == (19,)
    assert tree.children_of(4) == (12,) and tree.children[19] == ()
    assert tree.path(19) == (3, 11, 19) and tree.path(12) == (0, 4, 12)
    mask = tree.ancestor_mask()
    assert mask.shape == (20, 20) and mask.dtype == torch.bool
    assert mask[19].nonzero().flatten().tolist() == [3, 11, 19]
    assert mask.sum().item() == 4 * 1 + 8 * 2 + 8 * 3
    assert tree.ancestor_mask() is mask  # computed once per tree


def test_empty_tree() -> None:
    tree = TokenTree.from_parents([])
    assert len(tree) == 0 and tree.depth == 0 and tree.roots == () and tree.depths == ()
    assert tree.ancestor_mask().shape == (0, 0) and tree.follow([], [1, 2]) == []


def test_equality_is_by_parents() -> None:
    assert TokenTree([-1, 0, 0]) == TokenTree.from_parents(torch.tensor([-1, 0, 0]))
    assert TokenTree([-1, 0, 0]) != TokenTree([-1, 0, 1])
    assert len({TokenTree([-1, 0]), TokenTree((-1, 0))}) == 1


def test_follow_takes_the_first_matching_child_and_stops_at_a_mismatch() -> None:
    # the context has children 0 (token 5), 1 (token 5, a duplicate), 2 (token 6);
    # node 0 has child 3 (token 7), node 1 has child 4 (token 8), node 3 has child 5 (token 9)
    tree = TokenTree([-1, -1, -1, 0, 1, 3])
    tokens = [5, 5, 6, 7, 8, 9]
    assert tree.follow(tokens, [5, 7, 9]) == [0, 3, 5]
    assert tree.follow(tokens, [5, 7, 9, 1, 2]) == [0, 3, 5]  # beyond a leaf: stops
    assert tree.follow(tokens, [5, 8]) == [0]  # 8 hangs below the duplicate node 1: never entered
    assert tree.follow(tokens, [6, 7]) == [2]
    assert tree.follow(tokens, [4, 5]) == []
    assert tree.follow(tokens, []) == []
    assert tree.follow(torch.tensor(tokens), torch.tensor([5, 7])) == [0, 3]
    with pytest.raises(ValueError, match="node_tokens has 2 entries for a tree of 6 nodes"):
        tree.follow([5, 5], [5])


def test_validation_names_the_bad_parent() -> None:
    with pytest.raises(ValueError, match=r"parents\[1\] = 1: a node's parent must be -1 .*earlier"):
        TokenTree.from_parents([-1, 1])
    with pytest.raises(ValueError, match=r"parents\[0\] = -2"):
        TokenTree.from_parents([-2])
    with pytest.raises(ValueError, match=r"parents\[2\] = 5"):
        TokenTree.check(torch.tensor([-1, 0, 5]))
    with pytest.raises(ValueError, match=r"must be 1-D.*got shape \(2, 2\)"):
        TokenTree.from_parents(torch.tensor([[-1, 0], [0, 1]]))
    with pytest.raises(ValueError, match=r"integer node indices, got dtype torch.float32"):
        TokenTree.from_parents(torch.tensor([-1.0, 0.0]))
    with pytest.raises(ValueError, match=r"my.parents must have shape \(3,\), got \(2,\)"):
        TokenTree.check([-1, 0], 3, name="my.parents")
    TokenTree.check(torch.tensor([-1, 0, 0]), 3)


def test_block_builds_its_tree_once_with_the_same_errors() -> None:
    rows = torch.full((3, 4), 0.25)
    block = Block(torch.tensor([1, 2, 3]), rows, torch.tensor([-1, -1, 1]))
    assert block.tree == TokenTree([-1, -1, 1]) and block.depth == 2 and block.is_tree
    chain = Block(torch.tensor([1, 2, 3]), rows)
    assert chain.tree is None and chain.depth == 3 and not chain.is_tree
    with pytest.raises(ValueError, match=r"Block.parents\[1\] = 1.*earlier node"):
        Block(torch.tensor([1, 2]), rows[:2], torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match=r"Block.parents must have shape \(3,\), got \(2,\)"):
        Block(torch.tensor([1, 2, 3]), rows, torch.tensor([-1, 0]))


def test_without_removes_mass_and_renormalises() -> None:
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert torch.allclose(without(q, [3]), torch.tensor([1 / 6, 2 / 6, 3 / 6, 0.0]))
    assert torch.allclose(without(q, [0, 2, 0]), torch.tensor([0.0, 1 / 3, 0.0, 2 / 3]))
    assert torch.equal(without(q, []), q)
    assert torch.equal(q, torch.tensor([0.1, 0.2, 0.3, 0.4]))  # the input is not modified
    # all mass removed: an all-zero row, not NaN
    assert torch.equal(without(q, [0, 1, 2, 3]), torch.zeros(4))
    one_hot = torch.tensor([0.0, 1.0, 0.0])
    assert torch.equal(without(one_hot, [1]), torch.zeros(3))
    assert torch.equal(without(one_hot, [0]), one_hot)


@st.composite
def parents_vectors(draw: st.DrawFn) -> list[int]:
    n = draw(st.integers(0, 24))
    return [draw(st.integers(-1, i - 1)) for i in range(n)]


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(parents_vectors())
def test_random_trees_are_consistent(parents: list[int]) -> None:
    tree = TokenTree.from_parents(parents)
    mask = tree.ancestor_mask()
    for i in range(len(parents)):
        path = tree.path(i)
        assert len(path) == tree.depths[i] + 1 and path[-1] == i
        assert all(tree.parents[b] == a for a, b in zip((-1, *path), path, strict=False))
        assert mask[i].nonzero().flatten().tolist() == list(path)
        assert i in tree.children_of(parents[i])
    assert tree.depth == max((len(tree.path(i)) for i in range(len(parents))), default=0)
    assert sorted(tree.roots + sum(tree.children, ())) == list(range(len(parents)))
    # following a node's own path's tokens with distinct tokens per node reaches that node
    tokens = list(range(100, 100 + len(parents)))
    for i in range(len(parents)):
        assert tree.follow(tokens, [tokens[j] for j in tree.path(i)]) == list(tree.path(i))
