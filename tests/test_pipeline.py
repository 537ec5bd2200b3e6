"""Pipeline behaviour that is not statistical: greedy decoding, stop tokens, lengths, seeds,
metrics bookkeeping, and clear errors for bad input (the messages are part of the contract)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import stats  # noqa: F401  (one torch thread: these tests run thousands of tiny generations)
import torch

from pyramid_core import (
    Block,
    ConfigError,
    Generation,
    Pipeline,
    PluginError,
    SamplingConfig,
    build_pipeline,
)
from pyramid_core.pipeline import LookupFirst
from pyramid_core.rng import Rng
from pyramid_core.testing import TableModel
from pyramid_core.types import LookupStats
from pyramid_plugins.exact import ExactPolicy
from pyramid_plugins.ngram import NgramProposer, lookup

V = 8


def hashed_row(salt: int, ctx: tuple[int, ...], vocab: int = V) -> torch.Tensor:
    """A deterministic pseudo-random distribution for (salt, full context)."""
    seed = zlib.crc32(repr((salt, ctx)).encode())
    row = torch.rand(vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.05
    return row / row.sum()


def target_fn(ctx: tuple[int, ...]) -> torch.Tensor:
    return hashed_row(0, ctx)


def stage_fn(salt: int, weight: float) -> Callable[[tuple[int, ...]], torch.Tensor]:
    """A smaller stage: the target's row mixed with its own noise, so that its argmax agrees
    with the target's only part of the time."""
    return lambda ctx: weight * target_fn(ctx) + (1 - weight) * hashed_row(salt, ctx)


def greedy_stages(n: int) -> list[TableModel]:
    smaller = [TableModel(stage_fn(k, 0.15 + 0.25 * (k - 1)), vocab_size=V, name=f"M{k}") for k in range(1, n)]
    return [*smaller, TableModel(target_fn, vocab_size=V, name="target")]


def reference_greedy(prompt: Sequence[int], n: int, stop: Sequence[int] = ()) -> list[int]:
    """The target's own greedy decoding (first index on ties, like torch.argmax)."""
    ctx, out = tuple(prompt), []
    for _ in range(n):
        token = int(np.argmax(target_fn(ctx).numpy()))
        out.append(token)
        if token in stop:
            break
        ctx = (*ctx, token)
    return out


PROMPT = [3, 1, 4]
GREEDY_CONFIGS = [(1, []), (2, [1]), (2, [4]), (3, [2, 3]), (3, [5, 5]), (4, [1, 1, 1]), (4, [1, 2, 3])]


@pytest.mark.parametrize(("n", "ells"), GREEDY_CONFIGS, ids=[f"N{n}-{ells}" for n, ells in GREEDY_CONFIGS])
def test_greedy_output_is_the_targets_argmax_chain(n: int, ells: list[int]) -> None:
    pipe = build_pipeline(greedy_stages(n), block_lengths=ells, sampling=SamplingConfig.greedy())
    expected = reference_greedy(PROMPT, 24)
    for seed in range(3):  # greedy output does not depend on the seed
        gen = pipe.generate(PROMPT, 24, seed=seed)
        assert gen.token_list == expected
    # the smaller stages really disagree with the target part of the time
    for b in gen.metrics.boundaries:
        assert 0 < b.accepted < b.proposed


def test_greedy_with_ngram_bottom_stage() -> None:
    prompt = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]
    pipe = build_pipeline(["ngram", *greedy_stages(2)], block_lengths=[2, 3], sampling=SamplingConfig.greedy())
    assert pipe.generate(prompt, 16, seed=0).token_list == reference_greedy(prompt, 16)


def test_ngram_lookup_matches_its_definition() -> None:
    """The vectorised lookup returns what the definition says, on random contexts over small
    vocabularies (many matches of every length): the longest suffix of ``max_ngram`` down to
    ``min_ngram`` tokens that occurs earlier, its most recent earlier occurrence, what followed."""

    def by_definition(ctx: list[int], n: int, max_ngram: int, min_ngram: int) -> list[int]:
        for k in range(min(max_ngram, len(ctx) - 1), min_ngram - 1, -1):
            for start in range(len(ctx) - k - 1, -1, -1):
                if ctx[start: start + k] == ctx[len(ctx) - k:]:
                    return ctx[start + k: start + k + n]
        return []

    gen = np.random.default_rng(0)
    found = 0
    for _ in range(600):
        ctx = gen.integers(0, int(gen.integers(2, 9)), size=int(gen.integers(1, 40))).tolist()
        n, lo = int(gen.integers(1, 6)), int(gen.integers(1, 3))
        hi = lo + int(gen.integers(0, 4))
        want = by_definition(ctx, n, hi, lo)
        assert lookup(ctx, n, hi, lo) == want, (ctx, n, hi, lo)
        found += bool(want)
    assert 100 < found < 600  # both outcomes were exercised


def test_greedy_ties_resolve_to_the_first_index() -> None:
    tie = TableModel([0.1, 0.35, 0.35, 0.2], name="target")
    draft = TableModel([0.4, 0.1, 0.1, 0.4], name="draft")  # itself tied between 0 and 3
    gen = build_pipeline([draft, tie], block_lengths=[3], sampling=SamplingConfig.greedy()).generate([0], 6, seed=0)
    assert gen.token_list == [1] * 6
    assert gen.metrics.boundaries[0].accepted == 0  # the draft always proposes 0


# ----------------------------------------------------------------------------------------------
# stop tokens and lengths
# ----------------------------------------------------------------------------------------------

MARKOV = [
    [[0.10, 0.30, 0.45, 0.15], [0.60, 0.10, 0.20, 0.10], [0.25, 0.45, 0.10, 0.20], [0.20, 0.35, 0.25, 0.20]],
    [[0.35, 0.35, 0.10, 0.20], [0.25, 0.25, 0.25, 0.25], [0.40, 0.20, 0.30, 0.10], [0.10, 0.15, 0.25, 0.50]],
    [[0.25, 0.40, 0.15, 0.20], [0.30, 0.30, 0.30, 0.10], [0.10, 0.30, 0.40, 0.20], [0.55, 0.15, 0.10, 0.20]],
    [[0.50, 0.25, 0.15, 0.10], [0.10, 0.50, 0.30, 0.10], [0.20, 0.10, 0.20, 0.50], [0.30, 0.30, 0.30, 0.10]],
]


def markov_stages(n: int) -> list[TableModel]:
    tables = MARKOV[len(MARKOV) - n :]
    return [TableModel(lambda ctx, t=t: t[ctx[-1]], vocab_size=4, name=f"M{i + 1}") for i, t in enumerate(tables)]


STOP_CONFIGS = [(2, [1]), (2, [3]), (3, [1, 1]), (3, [2, 3]), (3, [8, 8]), (2, [12])]


@pytest.mark.parametrize(("n", "ells"), STOP_CONFIGS, ids=[f"N{n}-{ells}" for n, ells in STOP_CONFIGS])
def test_output_ends_right_after_the_first_stop_token(n: int, ells: list[int]) -> None:
    """150 seeds, max_new_tokens=5, block lengths up to 12 (> max_new_tokens): every output has
    at most 5 tokens, contains a stop token only as its last token, and has exactly 5 tokens when
    it contains none. Both kinds of output must occur."""
    pipe = build_pipeline(markov_stages(n), block_lengths=ells, stop_ids=[3])
    ended = full = 0
    for seed in range(150):
        out = pipe.generate([0, 3, 1], 5, seed=seed).token_list  # a stop token in the prompt is ignored
        assert 1 <= len(out) <= 5
        assert 3 not in out[:-1], out
        if out[-1] == 3:
            ended += 1
        else:
            assert len(out) == 5, out
            full += 1
    assert ended > 10 and full > 10


def test_several_stop_ids() -> None:
    pipe = build_pipeline(markov_stages(3), block_lengths=[2, 3], stop_ids=[2, 3])
    for seed in range(100):
        out = pipe.generate([0], 6, seed=seed).token_list
        assert not {2, 3} & set(out[:-1])
        assert len(out) == 6 or out[-1] in (2, 3)


@pytest.mark.parametrize("ells", [[1], [4], [2, 2], [9, 9]])
def test_greedy_stop_matches_the_reference_cut_after_the_stop(ells: list[int]) -> None:
    expected = reference_greedy(PROMPT, 40)
    stop = expected[5]  # a token the greedy chain really produces
    pipe = build_pipeline(greedy_stages(len(ells) + 1), block_lengths=ells, sampling=SamplingConfig.greedy(),
                          stop_ids=[stop])
    assert pipe.generate(PROMPT, 40, seed=0).token_list == reference_greedy(PROMPT, 40, stop=[stop])


@pytest.mark.parametrize(("n", "ells"), [(1, []), (2, [5]), (3, [7, 9]), (4, [1, 2, 3])])
@pytest.mark.parametrize("max_new", [1, 2, 3, 7])
def test_never_more_than_max_new_tokens(n: int, ells: list[int], max_new: int) -> None:
    pipe = build_pipeline(markov_stages(n), block_lengths=ells)
    for seed in range(20):
        gen = pipe.generate([1], max_new, seed=seed)
        assert len(gen.token_list) == max_new
        assert gen.metrics.new_tokens == max_new


def test_zero_new_tokens_gives_an_empty_generation() -> None:
    pipe = build_pipeline(markov_stages(3), block_lengths=[2, 2])
    gen = pipe.generate([1, 2], 0, seed=0)
    assert isinstance(gen, Generation)
    assert gen.token_list == []
    assert gen.tokens.numel() == 0
    assert gen.metrics.new_tokens == 0
    assert all(s.forwards == 0 for s in gen.metrics.stages)


def test_prompt_may_be_a_tensor_or_a_list() -> None:
    pipe = build_pipeline(markov_stages(2), block_lengths=[2])
    a = pipe.generate([1, 2], 8, seed=4).token_list
    assert pipe.generate(torch.tensor([1, 2]), 8, seed=4).token_list == a
    assert pipe.generate((1, 2), 8, seed=4).token_list == a


# ----------------------------------------------------------------------------------------------
# seeds
# ----------------------------------------------------------------------------------------------


def test_same_seed_reproduces_the_run_and_different_seeds_differ() -> None:
    pipe = build_pipeline(markov_stages(3), block_lengths=[2, 3])
    runs = [pipe.generate([0], 12, seed=s) for s in range(20)]
    again = [pipe.generate([0], 12, seed=s) for s in range(20)]
    for a, b in zip(runs, again, strict=True):
        assert a.token_list == b.token_list
        for ba, bb in zip(a.metrics.boundaries, b.metrics.boundaries, strict=True):
            assert repr(ba.as_dict()) == repr(bb.as_dict())  # repr: NaN == NaN
    # 12 tokens over 4 symbols: 20 seeds give (almost surely) 20 different sequences
    assert len({tuple(r.token_list) for r in runs}) >= 18


def test_no_seed_still_runs() -> None:
    pipe = build_pipeline(markov_stages(2), block_lengths=[2])
    outs = {tuple(pipe.generate([0], 12).token_list) for _ in range(5)}
    assert len(outs) >= 2


def test_a_fresh_pipeline_gives_the_same_tokens_for_the_same_seed() -> None:
    a = build_pipeline(markov_stages(3), block_lengths=[2, 3]).generate([0], 10, seed=99).token_list
    b = build_pipeline(markov_stages(3), block_lengths=[2, 3]).generate([0], 10, seed=99).token_list
    assert a == b


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "ells"), [(2, [4]), (3, [2, 3]), (4, [1, 2, 3]), (4, [1, 2, 5])])
def test_metrics_add_up(n: int, ells: list[int]) -> None:
    """Bookkeeping identities of one generation without stop tokens (25 tokens, 20 seeds)."""
    stages = markov_stages(n)
    pipe = build_pipeline(stages, block_lengths=ells)
    for seed in range(20):
        gen = pipe.generate([2], 25, seed=seed)
        m = gen.metrics
        b, s = m.boundaries, m.stages
        assert len(b) == n - 1 and len(s) == n
        assert m.new_tokens == len(gen.token_list) == 25
        # the top boundary emits accepted + 1 tokens per round; only the last round may overshoot
        assert b[-1].accepted + b[-1].rounds in (m.new_tokens, m.new_tokens + 1)
        # one target forward per verification round; every verifier scores block + 1 positions
        assert m.target_forwards == s[-1].forwards == b[-1].rounds
        for k in range(1, n):
            assert s[k].forwards == b[k - 1].rounds
            assert s[k].positions == b[k - 1].proposed + b[k - 1].rounds
        # the bottom model samples one token per forward, exactly what the first boundary saw
        assert s[0].forwards == s[0].positions == b[0].proposed
        # what stage k produced (accepted + emitted) is what it handed up, plus at most one
        # overshooting token per request from the stage above
        for k in range(1, n - 1):
            produced = b[k - 1].accepted + b[k - 1].rounds
            assert b[k].proposed <= produced <= b[k].proposed + b[k].rounds
        assert m.tokens_per_target_forward == pytest.approx(m.new_tokens / s[-1].forwards)
        for k, bk in enumerate(b):
            d = bk.as_dict()
            assert 0.0 <= d["acceptance_rate"] <= 1.0
            assert d["acceptance_rate"] == pytest.approx(bk.accepted / bk.proposed)
            hist = d["accepted_length_hist"]
            assert sum(hist) == bk.rounds
            assert sum(i * h for i, h in enumerate(hist)) == bk.accepted
            assert len(hist) <= ells[k] + 1
            assert bk.proposed <= bk.rounds * ells[k]
            assert d["mean_accepted_length"] == pytest.approx(bk.accepted / bk.rounds)
            by_pos = d["acceptance_by_position"]
            assert len(by_pos) <= ells[k]
            assert all(0.0 <= a <= 1.0 for a in by_pos)
            # position 0 is proposed in every round that had a block
            assert bk.proposed_at[0] == bk.rounds
        assert m.wall_s > 0
        assert all(st.forward_s >= 0 for st in s)
        assert m.overhead_s == pytest.approx(m.wall_s - sum(st.forward_s for st in s))
        d = m.as_dict()
        assert d["new_tokens"] == 25 and d["target_forwards"] == s[-1].forwards
        assert [x["name"] for x in d["stages"]] == [st.name for st in stages]


def test_identical_stages_accept_everything() -> None:
    """A draft equal to the target is always accepted: every round yields ell + 1 tokens."""
    same = markov_stages(1)[0]
    pipe = build_pipeline([TableModel(lambda ctx: MARKOV[-1][ctx[-1]], vocab_size=4), same], block_lengths=[4])
    gen = pipe.generate([0], 20, seed=1)
    b = gen.metrics.boundaries[0]
    assert b.acceptance_rate == 1.0
    assert gen.metrics.target_forwards == 4
    assert gen.metrics.tokens_per_target_forward == 5.0
    assert b.as_dict()["accepted_length_hist"] == [0, 0, 0, 0, 4]


def test_single_stage_pipeline_is_plain_sampling() -> None:
    gen = build_pipeline(markov_stages(1)).generate([0], 9, seed=0)
    assert gen.metrics.boundaries == []
    assert gen.metrics.target_forwards == 9
    assert gen.metrics.tokens_per_target_forward == 1.0


# ----------------------------------------------------------------------------------------------
# bad input: the error names the culprit
# ----------------------------------------------------------------------------------------------


def tables(*sizes: int) -> list[TableModel]:
    return [TableModel([1.0 / v] * v, name=f"M{i + 1}") for i, v in enumerate(sizes)]


def test_distribution_not_summing_to_one() -> None:
    with pytest.raises(ConfigError, match=r"^draft: probabilities must sum to 1, got 0\.9$"):
        TableModel([0.5, 0.4], name="draft")


def test_negative_probability() -> None:
    with pytest.raises(ConfigError, match=r"draft: probabilities must be >= 0, got -0\.2.* at index 1"):
        TableModel([1.2, -0.2], name="draft")


def test_nan_probability() -> None:
    with pytest.raises(ConfigError, match=r"draft: distribution contains NaN at index 0"):
        TableModel([math.nan, 1.0], name="draft")


def test_bad_row_of_a_context_dependent_table_names_stage_and_context() -> None:
    def broken(ctx: tuple[int, ...]) -> list[float]:
        return [0.5, 0.6, 0.0, 0.0] if ctx[-1] == 2 else [0.25] * 4

    pipe = build_pipeline([*markov_stages(1), TableModel(broken, vocab_size=4, name="qualifier"), *markov_stages(1)],
                          block_lengths=[2, 2])
    with pytest.raises(ConfigError, match=r"qualifier after context \(.*2\): probabilities must sum to 1, got 1\.1"):
        pipe.generate([0, 2], 4, seed=0)


def test_context_dependent_table_needs_vocab_size() -> None:
    with pytest.raises(ConfigError, match="M9: a context-dependent table needs vocab_size"):
        TableModel(lambda ctx: [1.0], name="M9")


def test_wrong_number_of_policies() -> None:
    with pytest.raises(ConfigError, match=r"3 stages need 2 acceptance policies \(one per boundary\), got 1"):
        Pipeline(tables(4, 4, 4), [ExactPolicy()], [2, 2])
    with pytest.raises(ConfigError, match="3 stages need 2 acceptance policies"):
        build_pipeline(tables(4, 4, 4), ["exact", "exact", "exact"], [2, 2])


def test_wrong_number_of_block_lengths() -> None:
    with pytest.raises(ConfigError, match=r"3 stages need 2 block lengths \(one per boundary\), got 3"):
        build_pipeline(tables(4, 4, 4), block_lengths=[2, 2, 2])
    with pytest.raises(ConfigError, match=r"2 stages need 1 block lengths .*got 0"):
        Pipeline(tables(4, 4), [ExactPolicy()], [])


@pytest.mark.parametrize("bad", [0, -1, 2.0])
def test_block_length_below_one_or_not_an_integer(bad: object) -> None:
    with pytest.raises(ConfigError, match=rf"block length at boundary 2 -> 3 must be an integer >= 1, got {bad!r}"):
        build_pipeline(tables(4, 4, 4), block_lengths=[3, bad])  # type: ignore[list-item]


def test_empty_prompt() -> None:
    pipe = build_pipeline(tables(4, 4), block_lengths=[2])
    with pytest.raises(ConfigError, match="the prompt is empty"):
        pipe.generate([], 3, seed=0)


@pytest.mark.parametrize("bad", [-1, 2.5])
def test_bad_max_new_tokens(bad: object) -> None:
    pipe = build_pipeline(tables(4, 4), block_lengths=[2])
    with pytest.raises(ConfigError, match=rf"max_new_tokens must be an integer >= 0, got {bad!r}"):
        pipe.generate([0], bad, seed=0)  # type: ignore[arg-type]


def test_unknown_policy_name_suggests_the_closest() -> None:
    with pytest.raises(PluginError, match=r"unknown policy 'exakt'; did you mean 'exact'\?"):
        build_pipeline(tables(4, 4), ["exakt"], [2])


def test_policy_without_decide() -> None:
    with pytest.raises(ConfigError, match=r"policy at boundary 1 -> 2 .* has no decide\(\) method"):
        Pipeline(tables(4, 4), [object()], [2])  # type: ignore[list-item]


def test_stages_disagreeing_on_vocab_size() -> None:
    with pytest.raises(ConfigError, match=r"stages disagree on the vocabulary size \(M1: 4, M2: 5\)"):
        build_pipeline(tables(4, 5), block_lengths=[2])


def test_proposer_with_another_vocab_size_than_the_target() -> None:
    """A proposer that declares a vocabulary (ngram does) must agree with the model stages;
    otherwise the mismatch only surfaces as a tensor-shape error deep inside a policy."""
    with pytest.raises(ConfigError, match=r"vocabulary size.*ngram: 5"):
        Pipeline([NgramProposer(vocab_size=5), *tables(4)], [ExactPolicy()], [2])


def test_proposer_as_a_middle_stage() -> None:
    with pytest.raises(ConfigError, match=r"ngram must be a model Stage .* can only be the first stage"):
        build_pipeline([*tables(4), "ngram", *tables(4)], block_lengths=[2, 2])


def test_proposer_as_the_target() -> None:
    with pytest.raises(ConfigError, match=r"the target \(stage 2, 'ngram'\) must be a model stage, not a proposer"):
        build_pipeline([*tables(4), "ngram"], block_lengths=[2])
    with pytest.raises(ConfigError, match=r"ngram must be a model Stage"):
        Pipeline([*tables(4), NgramProposer(vocab_size=4)], [ExactPolicy()], [2])


def test_proposer_as_the_only_stage_is_refused_at_construction() -> None:
    """N = 1: the single stage is the target, so it must be a model stage -- a proposer cannot
    be sampled on its own. The error must come when the pipeline is built, naming the proposer."""
    with pytest.raises(ConfigError, match=r"ngram"):
        Pipeline([NgramProposer(vocab_size=4)])


def test_no_stages() -> None:
    with pytest.raises(ConfigError, match="at least one stage"):
        Pipeline([])
    with pytest.raises(ConfigError, match="at least one stage"):
        build_pipeline([])


# ----------------------------------------------------------------------------------------------
# a lookup asked first (docs/algorithms.md "Lookup first")
# ----------------------------------------------------------------------------------------------

REPEATING = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2]


@pytest.mark.parametrize("tree", [None, "tree:budget=6,branching=2"], ids=["chain", "tree"])
def test_greedy_with_a_lookup_is_the_targets_argmax_chain(tree: str | None) -> None:
    """The lookup proposes in some rounds and the draft (a chain, or a token tree) in the others;
    the output is still the target's greedy chain, and the metrics count both kinds of round."""
    pipe = build_pipeline(greedy_stages(2), block_lengths=[3], sampling=SamplingConfig.greedy(), lookup="ngram",
                          tree=tree)
    gen = pipe.generate(REPEATING, 32, seed=0)
    assert gen.token_list == reference_greedy(REPEATING, 32)
    look = gen.metrics.lookup
    assert look is not None and 0 < look.hits < look.tries
    assert gen.metrics.boundaries[0].rounds == look.tries
    assert gen.metrics.stages[0].forwards > 0  # the draft drafted in the rounds the lookup left
    assert gen.metrics.as_dict()["lookup"]["hits"] == look.hits
    pooled = type(gen.metrics).pool([gen.metrics, gen.metrics]).lookup
    assert pooled is not None and (pooled.tries, pooled.hits) == (2 * look.tries, 2 * look.hits)
    plain = build_pipeline(greedy_stages(2), block_lengths=[3], sampling=SamplingConfig.greedy(), tree=tree)
    assert plain.generate(REPEATING, 32).metrics.lookup is None


def one_hot_rows(tokens: Sequence[int]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), V).float()


def test_a_chain_grafted_into_a_tree_shares_its_matching_nodes_or_stands_apart() -> None:
    """``Block.graft``: with ``share`` the chain runs through the nodes whose tokens it matches
    and only its rest is added below the last one; without, it is a path of its own placed first.
    Every node keeps its row."""
    #        context -> 5 (0) -> 6 (2) -> 7 (3)
    #                -> 4 (1)
    tree = Block(torch.tensor([5, 4, 6, 7]), one_hot_rows([5, 4, 6, 7]), torch.tensor([-1, -1, 0, 2]))
    chain = Block(torch.tensor([5, 6, 1, 2]), one_hot_rows([5, 6, 1, 2]))
    shared = tree.graft(chain, share=True)
    assert shared.tokens.tolist() == [5, 4, 6, 7, 1, 2]
    assert shared.parents is not None and shared.parents.tolist() == [-1, -1, 0, 2, 2, 4]
    assert torch.equal(shared.rows[4:], chain.rows[2:])
    assert tree.graft(chain.head(2), share=True) is tree  # wholly inside the tree: nothing added
    apart = tree.graft(chain, share=False)
    assert apart.tokens.tolist() == [5, 6, 1, 2, 5, 4, 6, 7]
    assert apart.parents is not None and apart.parents.tolist() == [-1, 0, 1, 2, -1, -1, 4, 6]
    assert apart.tree is not None and apart.tree.roots == (0, 4, 5)  # the chain's root is tried first
    assert torch.equal(apart.rows, torch.cat([chain.rows, tree.rows]))
    # a chain drafted below is a tree of one path; an empty side leaves the other as it was
    drafted = Block(torch.tensor([5, 3]), one_hot_rows([5, 3]))
    both = drafted.graft(chain, share=True)
    assert both.tokens.tolist() == [5, 3, 6, 1, 2] and both.parents is not None
    assert both.parents.tolist() == [-1, 0, 0, 2, 3]
    assert drafted.graft(Block.empty(V), share=False) is drafted
    assert Block.empty(V).graft(chain, share=False) is chain
    with pytest.raises(ValueError, match="grafts a chain block, got a token tree"):
        chain.graft(tree, share=True)
    sequoia = Block(tree.tokens, tree.rows, tree.parents, without_replacement=True)
    with pytest.raises(ValueError, match=r"drawn without replacement \(Sequoia\)"):
        sequoia.graft(chain, share=False)


@pytest.mark.parametrize("tree", [None, "tree:budget=6,branching=2"], ids=["chain", "tree"])
def test_greedy_with_a_grafted_lookup_is_the_targets_argmax_chain(tree: str | None) -> None:
    """``lookup_graft``: the draft drafts every round and the lookup's block joins it as one more
    path; the output is still the target's greedy chain, with at least as many tokens per target
    forward here as the lookup asked first, since every round keeps the draft's proposal too."""
    def run(graft: bool) -> Generation:
        pipe = build_pipeline(greedy_stages(2), block_lengths=[3], sampling=SamplingConfig.greedy(),
                              lookup="ngram", lookup_graft=graft, tree=tree)
        return pipe.generate(REPEATING, 32, seed=0)

    grafted, first = run(True), run(False)
    assert grafted.token_list == first.token_list == reference_greedy(REPEATING, 32)
    look = grafted.metrics.lookup
    assert look is not None and 0 < look.hits < look.tries
    rounds = grafted.metrics.boundaries[0].rounds
    assert rounds == look.tries
    per_round = 1 if tree is None else 2  # a chain is one forward per token; the tree one per depth
    assert grafted.metrics.stages[0].forwards >= rounds * per_round - 2  # the draft drafts every round
    assert grafted.metrics.boundaries[0].tree_rounds > 0  # grafted rounds verify a tree
    assert grafted.metrics.target_forwards <= first.metrics.target_forwards


def test_lookup_graft_errors_name_the_option() -> None:
    with pytest.raises(ConfigError, match=r"lookup_graft grafts the lookup's block into stage 1's; give a lookup"):
        build_pipeline(greedy_stages(2), block_lengths=[2], lookup_graft=True)
    with pytest.raises(ConfigError, match=r"lookup_graft grafts the lookup's block into stage 1's; give a lookup"):
        Pipeline(greedy_stages(2), [ExactPolicy()], [2], lookup_graft=True)
    with pytest.raises(ConfigError, match=r"lookup_graft verifies token trees at boundary 1 -> 2, but its policy "
                                          r"'block' verifies chains only; use a policy that verifies trees there "
                                          r"\(.*exact.*\) or drop lookup_graft"):
        build_pipeline(greedy_stages(2), ["block"], [2], lookup="ngram", lookup_graft=True)
    sequoia = build_pipeline(greedy_stages(2), block_lengths=[2], lookup="ngram", lookup_graft=True,
                             tree="tree:branching=2,replacement=false")
    with pytest.raises(ConfigError, match=r"lookup_graft: tree\[2,no-repl\]\(M1\) drafts its tree without "
                                          r"replacement \(Sequoia\).*tree:replacement=true"):
        sequoia.generate(REPEATING, 8, seed=0)


def test_a_lookup_block_ends_at_its_first_stop_token() -> None:
    """Prompt lookup copies what followed an earlier match, stop tokens included; the block is
    cut right after the stop token (nothing past it reaches the target)."""
    seen: list[list[int]] = []

    class Recording(ExactPolicy):
        def decide(self, block, p, rng):  # type: ignore[no-untyped-def]
            seen.append(block.tokens.tolist())
            return super().decide(block, p, rng)

    pipe = Pipeline(greedy_stages(2), [Recording()], [4], SamplingConfig.greedy(), [3],
                    lookup=NgramProposer(vocab_size=V))
    pipe.generate([1, 2, 3, 4, 5, 1, 2], 8)
    assert seen and seen[0] == [3]  # the match continues 3, 4, 5, 1: cut after the stop token 3


def test_lookup_errors_name_the_lookup() -> None:
    with pytest.raises(ConfigError, match=r"lookup='ngram' proposes to the stage above the bottom one"):
        build_pipeline(greedy_stages(1), lookup="ngram")
    with pytest.raises(PluginError, match=r"unknown proposer 'ngarm'; did you mean 'ngram'"):
        build_pipeline(greedy_stages(2), block_lengths=[2], lookup="ngarm")
    with pytest.raises(ConfigError, match=r"lookup='hf:path=x' names a model backend; the lookup is a model-free "
                                          r"proposer \(ngram"):
        build_pipeline(greedy_stages(2), block_lengths=[2], lookup="hf:path=x")
    with pytest.raises(ConfigError, match=r"the lookup \(M1\) must be a model-free Proposer"):
        Pipeline(greedy_stages(2), [ExactPolicy()], [2], lookup=greedy_stages(2)[0])
    with pytest.raises(ConfigError, match=r"vocabulary size.*ngram: 5"):
        Pipeline(greedy_stages(2), [ExactPolicy()], [2], lookup=NgramProposer(vocab_size=5))


def test_a_lookup_that_proposes_too_much_is_named() -> None:
    class Greedy:
        name = "too-long"

        def propose(self, context: torch.Tensor, n: int, rng: object) -> Block:
            return Block(torch.zeros(n + 1, dtype=torch.long), torch.full((n + 1, V), 1.0 / V))

    pipe = Pipeline(greedy_stages(2), [ExactPolicy()], [2], lookup=Greedy())
    with pytest.raises(ConfigError, match=r"lookup too-long proposed 3 tokens; a lookup proposes a chain of at most "
                                          r"the 2 tokens asked for"):
        pipe.generate(PROMPT, 4)


def test_the_lookups_tokens_alone_are_its_blocks_tokens() -> None:
    """``LookupFirst.look_tokens`` (vLLM's lanes need no rows) gives the tokens of ``look``'s
    block -- cut after the first stop token, counted as a try -- through the lookup's own
    ``lookup_tokens`` where it has one, and through ``propose`` where it has not."""
    class RowsOnly:  # a third-party lookup without lookup_tokens
        name = "rows-only"

        def propose(self, context: torch.Tensor, n: int, rng: object) -> Block:
            return NgramProposer(vocab_size=V).propose(context, n, Rng(0))

    drafter = greedy_stages(2)[0]
    for asked in (NgramProposer(vocab_size=V), RowsOnly()):
        first = LookupFirst(asked, drafter, LookupStats(), torch.tensor([3]))  # type: ignore[arg-type]
        for ctx in ([1, 2, 3, 4, 5, 1, 2], [1, 2, 4, 5, 6, 1, 2], [7, 6, 5]):
            block = first.look(torch.tensor(ctx), 4, Rng(0))
            assert first.look_tokens(np.array(ctx), 4, Rng(0)) == block.tokens.tolist()
        assert (first.stats.tries, first.stats.hits) == (6, 4)
        assert first.look_tokens(np.array([1, 2, 3, 4, 5, 1, 2]), 4, Rng(0)) == [3]  # cut after the stop token


def test_a_lookups_tokens_alone_that_are_too_many_are_named() -> None:
    class TooMany:
        name = "too-many"

        def lookup_tokens(self, context: np.ndarray, n: int) -> list[int]:
            return [1] * (n + 2)

        def propose(self, context: torch.Tensor, n: int, rng: object) -> Block:
            raise AssertionError("not asked")

    first = LookupFirst(TooMany(), greedy_stages(2)[0], LookupStats())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"lookup too-many proposed 5 tokens; a lookup proposes a chain of at "
                                          r"most the 3 tokens asked for"):
        first.look_tokens(np.array([1, 2, 1]), 3, Rng(0))
