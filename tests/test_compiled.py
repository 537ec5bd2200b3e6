"""The compiled (fast) execution mode of model stages on CPU (``pyramid_core.backends.hf.fast``): oneDNN
pre-packed linears and the buffer KV cache, on tiny random models (seconds).

Tolerances: a packed linear sums in another order than eager ``F.linear``, so logits may differ
in the last bits. On these models (logits of magnitude ~10-30) compiled and eager logits agree
within ``ATOL = 1e-3`` absolute; a rolled-back or tree-compacted compiled cache must reproduce a
fresh compiled recompute of the same context within ``TIGHT = 1e-4``. Greedy identity is asserted
against the compiled target's own greedy decoding (docs/algorithms.md "Compiled stages").
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pyramid_core import (
    Block,
    ConfigError,
    PipelineSpec,
    SamplingConfig,
    build_pipeline,
    make_stage,
)
from pyramid_core.backends.hf import HFStage
from pyramid_core.backends.hf.cache import StageCache, slot_layer_class
from pyramid_core.backends.hf.fast import PackedLinear, packed_view, packing_available
from pyramid_core.backends.hf.runtime import packing_bf16_available, resolve_mode
from pyramid_core.backends.hf.student import build_student
from pyramid_core.backends.hf.tiny import save_with_words
from pyramid_core.hookspecs import hookimpl
from pyramid_core.options import ExecutionMode
from pyramid_core.plugins import registries_with
from pyramid_core.testing import TableModel
from pyramid_core.tree import TokenTree

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")

ATOL = 1e-3
TIGHT = 1e-4
PROMPT = [3, 5, 7, 11, 13, 5, 7]


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed))


def chain(tokens: list[int]) -> Block:
    t = torch.tensor(tokens)
    return Block(t, torch.zeros(len(tokens), 0))


def tree(tokens: list[int], parents: list[int]) -> Block:
    t = torch.tensor(tokens)
    return Block(t, torch.zeros(len(tokens), 0), torch.tensor(parents))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 9, 16, 33])
@pytest.mark.parametrize("shape", [(32, 64), (576, 1536), (64, 5)])
def test_packed_linear_matches_eager(shape: tuple[int, int], m: int) -> None:
    k, n = shape
    gen = torch.Generator().manual_seed(m)
    lin = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.normal_(generator=gen)
        lin.bias.normal_(generator=gen)
    x = torch.randn(2, m, k, generator=gen)
    packed = PackedLinear(lin.weight, lin.bias)
    with torch.inference_mode():
        ref, out = lin(x), packed(x)
    assert out.shape == ref.shape
    # relative to the size of the dot products (sqrt(k) standard normal terms)
    assert (out - ref).abs().max() <= 1e-5 * k


def test_packed_view_leaves_the_model_untouched(tiny_models: dict[str, Any]) -> None:
    model = tiny_models["target"]
    view = packed_view(model)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    # per layer: q/k/v fused, o, gate/up fused, down; then the head
    assert sum(isinstance(m, PackedLinear) for m in view.modules()) == 4 * 2 + 1
    members = [m for m in view.modules() if type(m).__name__ == "_FusedMember"]
    attn = model.model.layers[0].self_attn
    assert len(members) == 5 * 2 and [m.out_features for m in members[:3]] == [
        attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
    assert view.get_input_embeddings().weight is model.get_input_embeddings().weight  # shared, not copied
    x = torch.tensor([PROMPT])
    with torch.inference_mode():
        assert (view(x).logits - model(x).logits).abs().max() < ATOL


def test_a_fused_member_called_alone_computes_its_own_slice(tiny_models: dict[str, Any]) -> None:
    """A member of a fused group (q, k, v) called on an input the group has not computed for,
    or out of order, or twice, returns what its own linear would."""
    model = tiny_models["target"]
    attn, view_attn = model.model.layers[0].self_attn, packed_view(model).model.layers[0].self_attn
    x, y = torch.randn(1, 3, 32), torch.randn(1, 2, 32)
    with torch.inference_mode():
        for name, arg in (("k_proj", x), ("q_proj", y), ("k_proj", y), ("k_proj", y), ("v_proj", x), ("v_proj", y)):
            got, want = getattr(view_attn, name)(arg), getattr(attn, name)(arg)
            assert got.shape == want.shape and (got - want).abs().max() < 1e-5, name


@pytest.fixture(scope="module")
def stages(tiny_models: dict[str, Any]) -> tuple[HFStage, HFStage]:
    model = tiny_models["target"]
    return HFStage(model, name="eager"), HFStage(model, name="compiled", compile=True)


def test_compiled_stage_scores_like_eager(stages: tuple[HFStage, HFStage]) -> None:
    eager, fast = stages
    assert fast.compiled and not eager.compiled and fast.model is eager.model
    for stage in stages:
        stage.reset()
    context = ids(40)
    for block in (None, chain([5, 9, 2]), chain(list(range(12))), tree([4, 8, 1, 6], [-1, -1, 0, 0])):
        a, b = eager.score(context, block), fast.score(context, block)
        assert a.shape == b.shape and (a - b).abs().max() < ATOL
        context = torch.cat([context, ids(3, seed=len(context))])


def test_rollback_of_the_stage_cache_matches_a_fresh_recompute(stages: tuple[HFStage, HFStage]) -> None:
    _, fast = stages
    fresh = HFStage(fast.model, name="fresh", compile=True)
    full = ids(300, seed=3)  # beyond the buffer's first capacity (256): it must grow
    fast.reset()
    fast.score(full[:290], chain(full[290:296].tolist()))
    for cut in (250, 120, 121, 5):  # roll back, then grow again
        got = fast.score(full[:cut], chain(full[cut : cut + 4].tolist()))
        assert fast.cached_tokens == tuple(full[: cut + 4].tolist())
        fresh.reset()
        want = fresh.score(full[:cut], chain(full[cut : cut + 4].tolist()))
        assert (got - want).abs().max() < TIGHT
    keys = fast.kv_state()[0][0]
    assert keys.shape[-2] == len(fast.cached_tokens)  # the views cover exactly the cached tokens


def test_tree_compaction_of_the_stage_cache(stages: tuple[HFStage, HFStage]) -> None:
    eager, fast = stages
    context = ids(30, seed=4)
    t = tree([4, 8, 1, 6, 2, 9], [-1, -1, 0, 0, 2, 3])
    for stage in stages:
        stage.reset()
        stage.score(context, t)
    # the next context follows the path 4 -> 1 -> 2 (nodes 0, 2, 4): compaction keeps it
    follow = torch.cat([context, torch.tensor([4, 1, 2, 7])])
    a, b = eager.score(follow), fast.score(follow)
    assert fast.cached_tokens[: len(follow) - 1] == tuple(follow[:-1].tolist())
    fresh = HFStage(fast.model, compile=True)
    assert (b - fresh.score(follow)).abs().max() < TIGHT and (a - b).abs().max() < ATOL


def test_sub_vocabulary_head_compiled(tiny_models: dict[str, Any]) -> None:
    target = tiny_models["target"]
    sub = torch.tensor([0, 3, 5, 7, 11, 13, 20, 33, 63])
    student = build_student(target, [0], sub)
    eager, fast = HFStage(student, name="sub"), HFStage(student, name="sub-fast", compile=True)
    assert any(isinstance(m, PackedLinear) for m in fast.runner.modules())
    a, b = eager.score(ids(20), chain([3, 5])), fast.score(ids(20), chain([3, 5]))
    off = torch.ones(64, dtype=torch.bool)
    off[sub] = False
    assert (b[:, off] == torch.finfo(b.dtype).min).all()  # never proposes outside its rows
    assert (a[:, sub] - b[:, sub]).abs().max() < ATOL


@pytest.mark.parametrize("ell", [1, 4])
def test_compiled_pipeline_is_greedy_identical_to_the_compiled_target(tiny_models: dict[str, Any], ell: int) -> None:
    target = HFStage(tiny_models["target"], name="target", compile=True)
    draft = HFStage(tiny_models["near"], name="near", compile=True)
    greedy = SamplingConfig.greedy()
    alone = build_pipeline([target], sampling=greedy, stop_ids=[]).generate(PROMPT, 40).token_list
    for stages in ([draft, target], ["ngram", target], [draft, draft, target]):
        n = len(stages)
        pipe = build_pipeline(stages, ["exact"] * (n - 1), [ell] * (n - 1), sampling=greedy, stop_ids=[])
        assert pipe.generate(PROMPT, 40).token_list == alone
    # HF's own loop over the compiled stage decodes the same tokens (the bench's reference)
    x = torch.tensor([PROMPT])
    with torch.inference_mode():
        out = target.runner.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=40)
    assert out[0, len(PROMPT):].tolist() == alone


def test_compile_option_through_specs(tmp_path: Path, tiny_models: dict[str, Any]) -> None:
    path = save_with_words(tiny_models["target"], tmp_path / "m")
    assert make_stage(f"hf:path={path},compile=true").compiled  # type: ignore[union-attr]
    assert not make_stage(f"hf:path={path}").compiled  # type: ignore[union-attr]
    auto: Any = make_stage(f"hf:path={path},compile=auto")  # measured on this machine: fast or eager per M
    assert auto.choice is not None and set(auto.choice.distinct) <= {ExecutionMode.EAGER, ExecutionMode.FAST}
    assert make_stage(f"hf:path={path},dtype=float16,compile=auto").choice is None  # type: ignore[union-attr]
    bf16: Any = make_stage(f"hf:path={path},dtype=bfloat16,compile=auto")
    if packing_bf16_available():  # oneDNN packs bfloat16 here: measured like float32
        assert bf16.choice is not None
        assert make_stage(f"hf:path={path},dtype=bfloat16,compile=true").compiled  # type: ignore[union-attr]
    else:  # an AVX2-only CPU: bfloat16 stages run eagerly, and the fast mode says why not
        assert bf16.choice is None and not bf16.compiled
        with pytest.raises(ConfigError, match=r"compile=true: oneDNN pre-packs bfloat16 weights only on CPUs with "
                                              r"AVX-512 \(BW, VL, DQ\) or AVX-NE-CONVERT"):
            make_stage(f"hf:path={path},dtype=bfloat16,compile=true")
    assert make_stage(f"hf:path={path},compile=fast").compiled  # type: ignore[union-attr]
    assert not make_stage(f"hf:path={path},compile=eager").compiled  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match=r"backend 'hf': compile must be one of auto, true \(fast\), false \(eager\), graphs, static, compiled, got 'maybe'"):
        make_stage(f"hf:path={path},compile=maybe")
    with pytest.raises(ConfigError, match=r"compile=true: the fast mode on CPU runs float32 or bfloat16 weights"):
        make_stage(f"hf:path={path},dtype=float16,compile=true")
    # PipelineSpec.compile reaches every model backend; a stage spec's own compile= wins
    spec = PipelineSpec(("ngram", f"hf:path={path},compile=false", f"hf:path={path}"), compile=True)
    stages = spec.load_stages()
    assert [getattr(s, "compiled", None) for s in stages] == [None, False, True]


def test_stage_cache_moves_its_fill_position_and_gathers() -> None:
    """The one cache of every model stage: slot layers write at the fill position and hand views
    of the filled part; truncate moves the position; keep gathers slots (and tracks) in order."""
    cache = StageCache(3)
    assert len(cache.layers) == 3 and all(isinstance(layer, slot_layer_class()) for layer in cache.layers)
    layer = cache.layers[0]
    k = torch.arange(2 * 300 * 4, dtype=torch.float32).reshape(1, 2, 300, 4)
    keys, values = layer.update(k[:, :, :200], -k[:, :, :200])
    keys, values = layer.update(k[:, :, 200:], -k[:, :, 200:])  # beyond the first 256 slots: it grows
    assert torch.equal(keys, k) and torch.equal(values, -k) and layer.get_seq_length() == 300
    layer.crop(-100)  # transformers' convention: negative drops, positive keeps
    assert torch.equal(layer.keys, k[:, :, :200])
    layer.crop(150)
    assert torch.equal(layer.keys, k[:, :, :150])
    layer.keep(torch.tensor([5, 1, 7]))
    assert torch.equal(layer.keys, k[:, :, [5, 1, 7]]) and layer.get_seq_length() == 3
    # token ids and tracks follow the same slots
    ids = torch.tensor([4, 8, 15, 16, 23, 42])
    cache.write_ids(0, ids)
    cache.write_track("f", 0, torch.arange(6.0).unsqueeze(1))
    assert cache.prefix(torch.tensor([4, 8, 15, 99, 23])) == 3 and cache.prefix(ids[:2]) == 2
    assert cache.prefix(torch.cat([ids, torch.tensor([1])])) == 6
    cache.truncate(4)
    assert cache.ids.tolist() == [4, 8, 15, 16] and cache.prefix(ids) == 4
    # a tree after the 4 cached tokens: nodes 0..3 (tokens 7, 9, 5, 2), node 2 under node 0, 3 under 2
    cache.write_track("f", 4, torch.tensor([[10.0], [11.0], [12.0], [13.0]]))
    cache.set_tree(TokenTree.from_parents([-1, -1, 0, 2]), [7, 9, 5, 2], torch.zeros(5, 1))
    assert cache.slots == 8
    cache.settle(torch.tensor([4, 8, 15, 16, 7, 5, 3]), 7)  # follows nodes 0 and 2, then leaves the tree
    assert cache.tree is None and cache.ids.tolist() == [4, 8, 15, 16, 7, 5]
    assert cache.track("f", slice(0, 6)).flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 10.0, 12.0]


def test_execution_mode_keeps_its_type_from_the_flag_to_the_stage() -> None:
    """compile is parsed once (flag, spec word or keyword) and reaches a backend as the same
    ``ExecutionMode`` object; ``auto`` has one meaning: fast only on a CPU, in float32."""
    from pyramid_core.cli import build_parser

    ns = build_parser().parse_args(["generate", "--prompt", "x", "--compile"])
    spec = PipelineSpec(("dummy",), compile=ns.compile)
    assert spec.compile is ExecutionMode.FAST and PipelineSpec(("x",), compile=False).compile is ExecutionMode.EAGER
    seen: list[object] = []

    def backend(compile: ExecutionMode = ExecutionMode.EAGER) -> object:
        seen.append(compile)
        return TableModel([0.5, 0.5])

    probe = types.ModuleType("probe_plugin")
    probe.register_backends = hookimpl(lambda register: register("probe", backend, "records its compile"))  # type: ignore[attr-defined]
    regs = registries_with(probe)
    make_stage("probe", regs=regs, compile=spec.compile)
    make_stage("probe:compile=auto", regs=regs, compile=spec.compile)  # the spec's own wins, parsed once
    assert seen == [ExecutionMode.FAST, ExecutionMode.AUTO] and all(type(v) is ExecutionMode for v in seen)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_mode(ExecutionMode.AUTO, cuda, torch.float32, "s") is ExecutionMode.GRAPHS
    assert resolve_mode(ExecutionMode.AUTO, cpu, torch.float16, "s") is ExecutionMode.EAGER  # nothing to measure
    assert resolve_mode(ExecutionMode.EAGER, cpu, torch.float32, "s") is ExecutionMode.EAGER
    if packing_available():  # eager and fast are timed on this machine: AUTO stays AUTO
        assert resolve_mode(ExecutionMode.AUTO, cpu, torch.float32, "s") is ExecutionMode.AUTO
        # bfloat16 is packed only where oneDNN can (AVX-512 or AVX-NE-CONVERT); elsewhere nothing to measure
        bf16 = ExecutionMode.AUTO if packing_bf16_available() else ExecutionMode.EAGER
        assert resolve_mode(ExecutionMode.AUTO, cpu, torch.bfloat16, "s") is bf16
    with pytest.raises(ValueError, match=r"stage 's': compile=true: the fast mode is implemented for CPU stages"):
        resolve_mode(ExecutionMode.FAST, cuda, torch.float32, "s")


def test_cli_compile_flags() -> None:
    from pyramid_core.cli import build_parser

    parser = build_parser()
    for command in (["generate", "--prompt", "x"], ["bench"], ["plan", "--stage", "ngram"], ["sweep", "--preset", "sd"]):
        assert parser.parse_args(command).compile is ExecutionMode.AUTO
        assert parser.parse_args([*command, "--no-compile"]).compile is ExecutionMode.EAGER
        assert parser.parse_args([*command, "--compile"]).compile is ExecutionMode.FAST
