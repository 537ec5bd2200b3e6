"""The graph execution mode's forwards (``compile=static`` on any device; ``compile=graphs``
captures the same forwards as CUDA graphs, checked on a GPU by benchmarks/cuda_check.py):
logits equal the eager stage's (atol 1e-4, float32) through rollback, growth of the static cache,
padding to buckets, token trees and their compaction, and kept features; pipelines over static
stages are greedy-identical to the static target's own decoding and to the eager target's."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pyramid_core import SamplingConfig, build_pipeline
from pyramid_core.backends.hf import HFStage
from pyramid_core.backends.hf import stage as stage_module
from pyramid_core.backends.hf.graphs import BUCKETS, bucket_of
from pyramid_core.errors import ConfigError
from pyramid_core.options import ExecutionMode
from pyramid_core.types import Block

TIGHT = 1e-4
PROMPT = [3, 5, 7, 11, 13, 5, 7]


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed))


def chain(tokens: list[int]) -> Block:
    return Block(torch.tensor(tokens), torch.zeros(len(tokens), 0))


def tree(tokens: list[int], parents: list[int]) -> Block:
    return Block(torch.tensor(tokens), torch.zeros(len(tokens), 0), torch.tensor(parents))


@pytest.fixture
def small_static(monkeypatch: pytest.MonkeyPatch) -> None:
    """Static caches start at 16 slots, so the tests make them grow."""
    monkeypatch.setattr(stage_module, "STATIC_SLOTS", 16)


def test_buckets() -> None:
    assert [bucket_of(m) for m in (1, 2, 3, 5, 8, 9, 17, 33, 64)] == [1, 2, 4, 8, 8, 16, 32, 64, 64]
    assert bucket_of(65) == 128 and bucket_of(200) == 256 and BUCKETS[0] == 1


def test_static_forwards_equal_eager_through_rollback_growth_and_trees(tiny_models: dict[str, Any],
                                                                      small_static: None) -> None:
    model = tiny_models["target"]
    eager, static = HFStage(model, name="eager"), HFStage(model, name="static", compile="static")
    assert static.mode is ExecutionMode.STATIC and not static.compiled
    full = ids(120, seed=5)
    steps: list[tuple[int, Block | None]] = [
        (10, None), (10, chain([5, 9, 2])), (13, chain(list(range(9)))),  # 9 fed: bucket 16
        (40, chain([1, 2])),  # grows past 16 and 32 slots
        (25, None),  # rolls back
        (25, tree([4, 8, 1, 6, 2, 9], [-1, -1, 0, 0, 2, 3])),
        (25, tree([4, 8, 1, 6, 2, 9, 7], [-1, -1, 0, 0, 2, 3, 4])),  # the same tree, grown
        (100, chain([3, 3, 3])),  # a long feed after a tree that the context leaves
    ]
    for length, block in steps:
        a, b = eager.score(full[:length], block), static.score(full[:length], block)
        assert a.shape == b.shape and (a - b).abs().max() < TIGHT, (length, block)
        assert static.cached_tokens == eager.cached_tokens
    # a tree, then a context that follows one of its paths: compaction keeps that path
    for stage in (eager, static):
        stage.reset()
        stage.score(full[:30], tree([4, 8, 1, 6, 2, 9], [-1, -1, 0, 0, 2, 3]))
    follow = torch.cat([full[:30], torch.tensor([4, 1, 2, 7])])
    a, b = eager.score(follow), static.score(follow)
    assert (a - b).abs().max() < TIGHT and static.cached_tokens == eager.cached_tokens
    kv_a, kv_b = eager.kv_state(), static.kv_state()
    assert all((ka - kb).abs().max() < TIGHT and (va - vb).abs().max() < TIGHT
               for (ka, va), (kb, vb) in zip(kv_a, kv_b, strict=True))


def test_static_features_equal_eager(tiny_models: dict[str, Any], small_static: None) -> None:
    model = tiny_models["target"]
    eager, static = HFStage(model), HFStage(model, compile="static")
    for stage in (eager, static):
        stage.enable_features((0, -1))
    full = ids(50, seed=7)
    for length, block in ((20, chain([1, 2, 3])), (30, tree([4, 8, 1], [-1, -1, 0])), (22, None)):
        eager.score(full[:length], block)
        static.score(full[:length], block)
        context = full[: length + 1]
        fa, fb = eager.features(context), static.features(context)
        assert fa.shape == fb.shape and (fa - fb).abs().max() < TIGHT


@pytest.mark.parametrize("ell", [1, 4])
def test_static_pipelines_are_greedy_identical(tiny_models: dict[str, Any], ell: int) -> None:
    greedy = SamplingConfig.greedy()
    target = HFStage(tiny_models["target"], name="target", compile="static")
    draft = HFStage(tiny_models["near"], name="near", compile="static")
    eager_target = HFStage(tiny_models["target"], name="eager")
    alone = build_pipeline([target], sampling=greedy, stop_ids=[]).generate(PROMPT, 40).token_list
    assert alone == build_pipeline([eager_target], sampling=greedy, stop_ids=[]).generate(PROMPT, 40).token_list
    for stages in ([draft, target], ["ngram", target], [draft, draft, target]):
        n = len(stages)
        pipe = build_pipeline(stages, ["exact"] * (n - 1), [ell] * (n - 1), sampling=greedy, stop_ids=[])
        assert pipe.generate(PROMPT, 40).token_list == alone
    pipe = build_pipeline([draft, target], ["exact"], [ell], tree="tree:branching=2-2", sampling=greedy, stop_ids=[])
    assert pipe.generate(PROMPT, 40).token_list == alone


def test_graph_mode_needs_cuda_and_feature_heads_have_no_graph_mode(tiny_models: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"compile=graphs: the graph mode captures CUDA graphs; this stage is on cpu"):
        HFStage(tiny_models["target"], name="t", compile="graphs")
    with pytest.raises(ConfigError, match=r"compile must be one of auto, .*graphs, static, compiled, got 'cudagraph'"):
        ExecutionMode.parse("cudagraph")
    from pyramid_core.backends.hf.head_stage import HEAD_MODES
    from pyramid_core.backends.hf.runtime import resolve_mode

    cuda = torch.device("cuda")
    assert resolve_mode(ExecutionMode.AUTO, cuda, torch.bfloat16, "s") is ExecutionMode.GRAPHS
    assert resolve_mode(ExecutionMode.AUTO, cuda, torch.bfloat16, "head", HEAD_MODES) is ExecutionMode.EAGER
    with pytest.raises(ValueError, match=r"stage 'head': compile=graphs is not available for this kind of stage"):
        resolve_mode(ExecutionMode.GRAPHS, cuda, torch.bfloat16, "head", HEAD_MODES)


def test_compiled_forwards_equal_eager_and_compile_once_per_bucket(tiny_models: dict[str, Any]) -> None:
    """``compile=compiled`` (CPU): the static forwards compiled by inductor, one graph per bucket;
    logits as eager's through a long prompt (fed in chunks of the largest bucket), rollback and
    token trees; a second pass over the same kinds of forwards compiles nothing; a pipeline over
    the compiled target is greedy-identical to the eager target."""
    from pyramid_core.backends.hf.runtime import COMPILED_MIN_TORCH, torch_release

    model = tiny_models["target"]
    if torch_release() < COMPILED_MIN_TORCH:  # the lowest torch supported: refused, saying why
        with pytest.raises((ValueError, ConfigError), match=r"compiled mode needs torch >= .*compiles again"):
            HFStage(model, name="compiled", compile="compiled")
        return
    eager, compiled = HFStage(model, name="eager"), HFStage(model, name="compiled", compile="compiled")
    assert compiled.mode is ExecutionMode.COMPILED and compiled._static is not None
    full = ids(200, seed=11)

    def rounds(start: int) -> None:
        steps: list[tuple[int, Block | None]] = [
            (start, None), (start, chain([5, 9, 2])), (start + 4, None), (start + 5, chain([7])),
            (start + 2, tree([4, 8, 1, 6, 2, 9], [-1, -1, 0, 0, 2, 3])),  # rolls back, then a tree
        ]
        for length, block in steps:
            a, b = eager.score(full[:length], block), compiled.score(full[:length], block)
            assert a.shape == b.shape and (a - b).abs().max() < TIGHT, (length, block)
            assert compiled.cached_tokens == eager.cached_tokens

    rounds(100)  # a 100-token prompt: two chunks of 64 slots
    after_first = compiled._static.compiles
    assert 1 <= after_first <= len(BUCKETS)
    for stage in (eager, compiled):
        stage.reset()
    rounds(120)  # another prompt length, the same kinds of forwards: nothing new to compile
    assert compiled._static.compiles == after_first
    greedy = SamplingConfig.greedy()
    alone = build_pipeline([eager], sampling=greedy, stop_ids=[]).generate(PROMPT, 24).token_list
    pipe = build_pipeline(["ngram", compiled], ["exact"], [3], sampling=greedy, stop_ids=[])
    assert pipe.generate(PROMPT, 24).token_list == alone
    # another model compiled in the same process gets graphs of its own (its weights are frozen
    # into them): a draft -> target chain of two compiled stages, each scoring as its eager self
    near = HFStage(tiny_models["near"], name="near", compile="compiled")
    near_eager = HFStage(tiny_models["near"], name="near-eager")
    for length, block in ((30, None), (30, chain([1, 2, 3])), (31, None)):
        a, b = near_eager.score(full[:length], block), near.score(full[:length], block)
        assert (a - b).abs().max() < TIGHT, (length, block)
    pipe = build_pipeline([near, compiled], ["exact"], [3], sampling=greedy, stop_ids=[])
    assert pipe.generate(PROMPT, 24).token_list == alone
    with pytest.raises(ValueError, match=r"compile=compiled: the compiled mode compiles static forwards with inductor "
                                         r"for CPU stages; this stage is on cuda"):
        from pyramid_core.backends.hf.runtime import resolve_mode

        resolve_mode(ExecutionMode.COMPILED, torch.device("cuda"), torch.float32, "s")
