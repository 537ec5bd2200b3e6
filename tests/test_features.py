"""The feature channel and feature-level drafts (docs/algorithms.md "Feature-level drafts").

- ``HFStage.features``: the hidden states its forwards computed, equal to a fresh full forward's
  (tolerance 1e-4, float32), kept and rolled back with the cache, gathered with a token tree.
- ``FeatureStage``: incremental scoring equals scoring from a fresh stage (the rows are a
  function of the context and of the source's features of that context only -- docs/algorithms.md, trap 2);
  chains and trees through the pipeline are greedy-identical to the target, and a sampled chain
  is exact (chi-square on the joint of two tokens, 4,000 runs, p > 1e-4; the same samples
  against a perturbed target's joint must be rejected, p < 1e-6).
- Build errors: a reader whose source is not a ``FeatureSource``, a layer the source lacks.
"""

from __future__ import annotations

import itertools
from typing import Any

import attrs
import pytest
import torch

from pyramid_core import ConfigError, SamplingConfig, build_pipeline
from pyramid_core.backends.hf.head import FeatureHead, FeatureHeadConfig
from pyramid_core.backends.hf.head_stage import FeatureStage
from pyramid_core.backends.hf.stage import HFStage
from pyramid_core.backends.hf.tiny import perturbed, tiny_llama
from pyramid_core.testing import TableModel
from pyramid_core.testing.exactness import chi_square_p_value
from pyramid_core.types import Block

GREEDY = SamplingConfig.greedy()


def _fresh_hidden(model: Any, ids: list[int], layer: int) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    index = model.config.num_hidden_layers if layer == -1 else layer + 1
    return out.hidden_states[index][0]


def _head(model: Any, variant: str = "eagle1", layers: tuple[int, ...] = (-1,), seed: int = 0) -> FeatureHead:
    torch.manual_seed(seed)
    return FeatureHead(model, FeatureHeadConfig(layers=layers, variant=variant))


@pytest.fixture(scope="module")
def target_model() -> Any:
    return tiny_llama(0, num_layers=3)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_features_match_a_fresh_forward_after_rollback_and_tree(target_model: Any, compile: bool) -> None:
    stage = HFStage(target_model, compile=compile)
    stage.enable_features((0, -1))
    ctx = torch.tensor([1, 2, 3, 4, 5])
    stage.score(ctx, Block(torch.tensor([6, 7, 8]), torch.zeros(3, 64)))
    full = [1, 2, 3, 4, 5, 6, 7, 8]
    want = torch.cat([_fresh_hidden(target_model, full, 0), _fresh_hidden(target_model, full, -1)], dim=-1)
    got = stage.features(torch.tensor(full))
    assert got.shape == (8, 64) and torch.allclose(got, want, atol=1e-4)
    # only tokens of the given context: a diverging context stops at the common prefix
    assert stage.features(torch.tensor([1, 2, 3, 9, 9])).shape[0] == 3
    # rollback: a different block after the same context
    stage.score(ctx, Block(torch.tensor([9, 10]), torch.zeros(2, 64)))
    full = [1, 2, 3, 4, 5, 9, 10]
    want = torch.cat([_fresh_hidden(target_model, full, 0), _fresh_hidden(target_model, full, -1)], dim=-1)
    assert torch.allclose(stage.features(torch.tensor(full)), want, atol=1e-4)
    assert torch.allclose(stage.features(torch.tensor(full), start=5), want[5:], atol=1e-4)
    # a token tree: node features along a path, then compaction onto that path
    tree = Block(torch.tensor([11, 12, 13, 14]), torch.zeros(4, 64), parents=torch.tensor([-1, -1, 0, 1]))
    stage.score(ctx, tree)
    path = [1, 2, 3, 4, 5, 12, 14]
    want = torch.cat([_fresh_hidden(target_model, path, 0), _fresh_hidden(target_model, path, -1)], dim=-1)
    assert torch.allclose(stage.features(torch.tensor(path)), want, atol=1e-4)
    stage.score(torch.tensor(path))  # the path becomes the cached context
    assert torch.allclose(stage.features(torch.tensor(path)), want, atol=1e-4)
    with pytest.raises(ValueError, match="keeps feature layers"):
        stage.features(torch.tensor(path), layers=(1,))


def test_a_layer_the_source_lacks_is_refused(target_model: Any) -> None:
    with pytest.raises(ValueError, match="has no feature layer 2"):
        HFStage(target_model).enable_features((2,))  # 3 layers: 0, 1 and -1 (the last, normed)


@pytest.mark.parametrize("variant,layers", [("eagle1", (-1,)), ("eagle3", (0, 1, -1))])
def test_incremental_scoring_equals_a_fresh_stage(target_model: Any, variant: str, layers: tuple[int, ...]) -> None:
    """However the cache got where it is -- rollbacks, stand-ins replaced by real features, a
    tree -- the rows equal those of a fresh stage given the same context and source state."""
    source = HFStage(target_model)
    source.enable_features(layers)
    draft = FeatureStage(_head(target_model, variant, layers))
    draft.attach(source)
    torch.manual_seed(3)
    for step in range(12):
        ctx = torch.randint(0, 64, (int(torch.randint(2, 9, ()).item()),))
        # the source scores a prefix of the context (so the draft mixes real features and stand-ins)
        seen = int(torch.randint(1, len(ctx) + 1, ()).item())
        source.score(ctx[:seen])
        block = Block(torch.randint(0, 64, (3,)), torch.zeros(3, 64)) if step % 3 else None
        got = draft.score(ctx, block)
        fresh = FeatureStage(draft.head)
        fresh.attach(source)
        want = fresh.score(ctx, block)
        assert torch.allclose(got, want, atol=1e-4), step


def _tables(model: Any) -> FeatureStage:
    return FeatureStage(_head(model))


@pytest.mark.parametrize("lengths", [[1], [3], [2, 4]])
def test_feature_draft_chains_are_greedy_identical_to_the_target(target_model: Any, lengths: list[int]) -> None:
    prompt = [1, 5, 9, 3]
    alone = build_pipeline([HFStage(target_model)], sampling=GREEDY, stop_ids=[])
    want = alone.generate(prompt, 20).token_list
    draft = FeatureStage(_head(target_model))
    stages: list[Any] = [draft, HFStage(target_model)]
    if len(lengths) == 2:  # draft -> qualifier (reads the qualifier's features) -> target
        stages.insert(1, HFStage(perturbed(target_model, seed=1, scale=0.05)))
    pipe = build_pipeline(stages, ["exact"] * len(lengths), lengths, sampling=GREEDY, stop_ids=[])
    out = pipe.generate(prompt, 20)
    assert out.token_list == want
    assert out.metrics.boundaries[0].proposed > 0


def test_feature_draft_tree_is_greedy_identical(target_model: Any) -> None:
    prompt = [2, 4, 6]
    want = build_pipeline([HFStage(target_model)], sampling=GREEDY, stop_ids=[]).generate(prompt, 16).token_list
    pipe = build_pipeline([FeatureStage(_head(target_model)), HFStage(target_model)], ["exact"], [3],
                          sampling=GREEDY, stop_ids=[], tree="tree:branching=3-2-1")
    assert pipe.generate(prompt, 16).token_list == want


def test_reading_the_target_in_a_three_stage_chain(target_model: Any) -> None:
    qualifier = HFStage(perturbed(target_model, seed=1, scale=0.05))
    draft = FeatureStage(_head(target_model), features_from="target")
    target = HFStage(target_model)
    pipe = build_pipeline([draft, qualifier, target], ["exact", "exact"], [2, 3], sampling=GREEDY, stop_ids=[])
    want = build_pipeline([HFStage(target_model)], sampling=GREEDY, stop_ids=[]).generate([3, 3, 7], 12).token_list
    assert pipe.generate([3, 3, 7], 12).token_list == want
    assert draft.source is target


def _joint(model: Any, prompt: list[int], vocab: int) -> list[float]:
    """P(x1, x2 | prompt) under ``model`` at temperature 1, by enumeration."""
    with torch.inference_mode():
        p1 = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].double(), -1)
        batch = torch.tensor([prompt + [a] for a in range(vocab)])
        p2 = torch.softmax(model(input_ids=batch).logits[:, -1].double(), -1)
    return [float(p1[a] * p2[a, b]) for a, b in itertools.product(range(vocab), range(vocab))]


def test_a_sampled_feature_chain_is_exact() -> None:
    vocab = 6
    model = tiny_llama(4, vocab_size=vocab, init_std=0.15)
    prompt = [1, 2]
    draft = FeatureStage(_head(model))
    pipe = build_pipeline([draft, HFStage(model)], ["exact"], [2], sampling=SamplingConfig(), stop_ids=[])
    counts = [0] * (vocab * vocab)
    runs = 4000
    for seed in range(runs):
        a, b = pipe.generate(prompt, 2, seed=seed).token_list
        counts[a * vocab + b] += 1
    assert chi_square_p_value(counts, _joint(model, prompt, vocab)) > 1e-4
    other = perturbed(model, seed=9, scale=0.3)
    assert chi_square_p_value(counts, _joint(other, prompt, vocab)) < 1e-6  # the test has power


@pytest.mark.parametrize("features_from", ["next", "target"])
def test_a_sampled_three_stage_feature_chain_is_exact(features_from: str) -> None:
    """feature -> qualifier -> target at temperature 1, the head reading the qualifier's features
    or the target's (across a qualifier that buffers tokens the target has not scored: the
    stand-in rule): the joint of two tokens is the target's (chi-square, 4,000 runs)."""
    vocab = 6
    model = tiny_llama(4, vocab_size=vocab, init_std=0.15)
    qualifier = HFStage(perturbed(model, seed=5, scale=0.4))
    draft, target = FeatureStage(_head(model, seed=1), features_from=features_from), HFStage(model)
    pipe = build_pipeline([draft, qualifier, target], ["exact", "exact"], [2, 3], sampling=SamplingConfig(),
                          stop_ids=[])
    counts = [0] * (vocab * vocab)
    for seed in range(4000):
        a, b = pipe.generate([1, 2], 2, seed=seed).token_list
        counts[a * vocab + b] += 1
    assert draft.source is (qualifier if features_from == "next" else target)
    assert chi_square_p_value(counts, _joint(model, [1, 2], vocab)) > 1e-4
    assert chi_square_p_value(counts, _joint(perturbed(model, seed=9, scale=0.3), [1, 2], vocab)) < 1e-6


def test_a_source_without_features_is_a_build_error(target_model: Any) -> None:
    draft = FeatureStage(_head(target_model))
    table = TableModel([1 / 64] * 64)
    with pytest.raises(ConfigError, match="cannot provide features"):
        build_pipeline([draft, table], ["exact"], [2])


def test_a_feature_width_mismatch_is_a_build_error(target_model: Any) -> None:
    draft = FeatureStage(_head(target_model))
    wider = HFStage(tiny_llama(0, hidden_size=48))
    with pytest.raises(ConfigError, match="expects features of width 32"):
        build_pipeline([draft, wider], ["exact"], [2])


def test_a_compiled_feature_stage_scores_like_eager(target_model: Any) -> None:
    from pyramid_core.backends.hf.fast import packing_available

    assert packing_available()  # oneDNN is part of every CPU build of torch this project supports
    head = _head(target_model)
    source = HFStage(target_model)
    source.enable_features((-1,))
    eager, fast = FeatureStage(head), FeatureStage(head, compile=True)
    eager.attach(source)
    fast.attach(source)
    ctx = torch.tensor([4, 8, 15, 16, 23])
    source.score(ctx[:3])
    for block in (None, Block(torch.tensor([42 % 64, 7]), torch.zeros(2, 64))):
        assert torch.allclose(eager.score(ctx, block), fast.score(ctx, block), atol=1e-4)
    pipe = build_pipeline([fast, HFStage(target_model, compile=True)], ["exact"], [3], sampling=GREEDY, stop_ids=[])
    want = build_pipeline([HFStage(target_model)], sampling=GREEDY, stop_ids=[]).generate([1, 2, 3], 12).token_list
    assert pipe.generate([1, 2, 3], 12).token_list == want


@pytest.mark.parametrize("variant,layers", [("eagle1", (-1,)), ("eagle3", (0, 1, -1))])
def test_feature_training_learns_resumes_and_loads(target_model: Any, tmp_path: Any, variant: str,
                                                   layers: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """30 steps on a tiny teacher corpus lower the loss and raise depth-1 agreement; a run
    stopped after 12 steps and resumed ends with the same weights as one straight run; the
    saved head loads as a stage (fp16 on disk) and drafts losslessly."""
    import json

    from pyramid_core.backends.hf.head_stage import load_feature_stage
    from pyramid_core.backends.hf.tiny import save_with_words
    from pyramid_core.lab.distill import heads as feature_mod
    from pyramid_core.lab.distill.corpus import TeacherRows, TrainSequence
    from pyramid_core.lab.distill.heads import FeatureTrainConfig, train_feature_head

    base = save_with_words(target_model, tmp_path / "base")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (24, 16), generator=gen)
    with torch.inference_mode():
        logp = torch.log_softmax(target_model(ids).logits.float(), dim=-1)[:, :-1]
    values, top = logp.topk(8, dim=-1)
    corpus = [TrainSequence("python", ids[i].tolist(), 0, TeacherRows(values[i].half(), top[i].to(torch.int32)))
              for i in range(24)]
    cfg = FeatureTrainConfig(layers=layers, variant=variant, sub_vocab=0, steps=30, batch_tokens=128, lr=1e-2,
                             warmup=3, save_every=6, unroll=2)
    straight = train_feature_head(target_model, corpus, cfg, tmp_path / "a", base=str(base), autocast=False,
                                  progress=False)
    assert straight["finished"] and straight["steps"] == 30
    history = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["history"]
    assert max(h["loss"] for h in history[-5:]) < history[0]["loss"]
    assert min(h["top1_1"] for h in history[-5:]) > history[0]["top1_1"]

    class StepClock:  # one minute per call: max_minutes stops the run early
        t = 0.0

        def perf_counter(self) -> float:
            StepClock.t += 30.0
            return StepClock.t

    with monkeypatch.context() as m:
        m.setattr(feature_mod, "time", StepClock())
        stopped = train_feature_head(target_model, corpus, cfg, tmp_path / "b", base=str(base), autocast=False,
                                     max_minutes=12, progress=False)
    assert not stopped["finished"] and 0 < stopped["steps"] < 30
    resumed = train_feature_head(target_model, corpus, cfg, tmp_path / "b", base=str(base), autocast=False,
                                 progress=False)
    assert resumed["finished"] and resumed["steps"] == 30
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["trainable"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["trainable"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    info = json.loads((tmp_path / "a" / "stage.json").read_text())
    assert info["training"]["steps"] == 30
    stage = load_feature_stage(str(tmp_path / "a"))
    assert stage.head.cfg.variant == variant and stage.feature_layers == layers
    want = build_pipeline([HFStage(target_model)], sampling=GREEDY, stop_ids=[]).generate([5, 6, 7], 12).token_list
    pipe = build_pipeline([stage, HFStage(target_model)], ["exact"], [3], sampling=GREEDY, stop_ids=[])
    assert pipe.generate([5, 6, 7], 12).token_list == want


@pytest.mark.parametrize("variant,layers", [("eagle1", (-1,)), ("eagle3", (0, 1, -1))])
def test_init_from_target_starts_from_its_last_layer(target_model: Any, variant: str,
                                                     layers: tuple[int, ...]) -> None:
    """``init=target``: the head's decoder layer is the target's last one (the u half of EAGLE-3's
    2H-wide q, k, v; the embedding half stays random), and the input map passes the deepest
    feature (EAGLE-3) or the feature half (EAGLE-1) through unchanged."""
    from pyramid_core.backends.hf.layers import decoder_layers
    from pyramid_core.lab.distill.heads import init_from_target

    head = _head(target_model, variant, layers)
    last = decoder_layers(target_model)[2][-1]
    init_from_target(head, target_model)
    mine = head.layers[0]
    hidden = head.hidden
    assert torch.equal(mine.mlp.down_proj.weight, last.mlp.down_proj.weight)
    assert torch.equal(mine.self_attn.o_proj.weight, last.self_attn.o_proj.weight)
    assert torch.equal(mine.post_attention_layernorm.weight, last.post_attention_layernorm.weight)
    q = mine.self_attn.q_proj.weight
    if variant == "eagle3":
        assert torch.equal(q[:, hidden:], last.self_attn.q_proj.weight)
        assert not torch.equal(q[:, :hidden], last.self_attn.q_proj.weight)
        assert torch.equal(head.hidden_norm.weight, last.input_layernorm.weight)
        f = torch.randn(2, 5, len(layers) * hidden)
        assert torch.allclose(head.fuse_features(f), f[..., 2 * hidden:])  # -1 is the deepest of (0, 1, -1)
    else:
        assert torch.equal(q, last.self_attn.q_proj.weight)
        u, e = torch.randn(2, 5, hidden), torch.randn(2, 5, hidden)
        assert torch.allclose(head.fc(torch.cat([u, e], dim=-1)), u)


def test_init_from_target_refuses_a_head_deeper_than_the_target(target_model: Any) -> None:
    from pyramid_core.lab.distill.heads import init_from_target

    torch.manual_seed(0)
    head = FeatureHead(target_model, FeatureHeadConfig(depth=4))
    with pytest.raises(ConfigError, match="4 layers, the target only 3"):
        init_from_target(head, target_model)


def test_runs_share_a_feature_cache_and_record_their_init(target_model: Any, tmp_path: Any) -> None:
    """Two heads of different starts read one ``features_dir``: the second computes nothing (its
    target is not called), and each records its ``init`` in the report."""
    from pyramid_core.backends.hf.tiny import save_with_words
    from pyramid_core.lab.distill.corpus import TeacherRows, TrainSequence
    from pyramid_core.lab.distill.heads import FeatureTrainConfig, train_feature_head

    base = save_with_words(target_model, tmp_path / "base")
    ids = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logp = torch.log_softmax(target_model(ids).logits.float(), dim=-1)[:, :-1]
    values, top = logp.topk(8, dim=-1)
    corpus = [TrainSequence("python", ids[i].tolist(), 0, TeacherRows(values[i].half(), top[i].to(torch.int32)))
              for i in range(6)]
    cache = tmp_path / "features"
    reports = {}
    calls = []
    hook = target_model.model.register_forward_hook(lambda *_: calls.append(1))  # features read model.model
    try:
        for init in ("random", "target"):
            calls.clear()
            cfg = FeatureTrainConfig(layers=(0, 1, -1), variant="eagle3", sub_vocab=0, steps=2, batch_tokens=64,
                                     warmup=1, init=init)
            reports[init] = train_feature_head(target_model, corpus, cfg, tmp_path / init, base=str(base),
                                               autocast=False, features_dir=cache, progress=False)
            assert bool(calls) == (init == "random")  # the first run fills the cache, the second reads it
    finally:
        hook.remove()
    assert (cache / "features.json").is_file()
    assert not (tmp_path / "target" / "features").exists()
    assert [reports[i]["config"]["init"] for i in ("random", "target")] == ["random", "target"]
    with pytest.raises(ValueError, match="init"):
        FeatureTrainConfig(init="zeros")


def test_a_warm_start_continues_a_trained_head(target_model: Any, tmp_path: Any) -> None:
    """``init=DIR``: the new run starts from the saved head's weights and keeps its
    sub-vocabulary rows (not the ones its own corpus would choose), records where it started,
    and a head of another architecture is refused naming the field that differs."""
    import json

    from pyramid_core.backends.hf.head import load_feature_head
    from pyramid_core.backends.hf.tiny import save_with_words
    from pyramid_core.lab.distill.corpus import TeacherRows, TrainSequence
    from pyramid_core.lab.distill.heads import (
        FeatureTrainConfig,
        init_from_head,
        train_feature_head,
    )

    base = save_with_words(target_model, tmp_path / "base")

    def corpus(low: int, high: int, seed: int) -> list[TrainSequence]:
        ids = torch.randint(low, high, (6, 12), generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            logp = torch.log_softmax(target_model(ids).logits.float(), dim=-1)[:, :-1]
        values, top = logp.topk(8, dim=-1)
        return [TrainSequence("python", ids[i].tolist(), 0, TeacherRows(values[i].half(), top[i].to(torch.int32)))
                for i in range(6)]

    cfg = FeatureTrainConfig(layers=(0, 1, -1), variant="eagle3", sub_vocab=16, steps=3, batch_tokens=64, warmup=1,
                             lr=1e-2)
    train_feature_head(target_model, corpus(0, 32, 1), cfg, tmp_path / "first", base=str(base), autocast=False,
                       progress=False)
    first = load_feature_head(tmp_path / "first", target_model)
    warm = init_from_head(tmp_path / "first", target_model, cfg.head)
    assert warm.trainable_state().keys() == first.trainable_state().keys()
    assert all(torch.equal(v, first.trainable_state()[k]) for k, v in warm.trainable_state().items())

    # the second corpus holds only tokens 32..63: a fresh head would choose other rows
    later = attrs.evolve(cfg, init=str(tmp_path / "first"), lr=1e-3)
    report = train_feature_head(target_model, corpus(32, 64, 2), later, tmp_path / "second", base=str(base),
                                autocast=False, progress=False)
    second = load_feature_head(tmp_path / "second", target_model)
    assert torch.equal(second.own_head.token_ids, first.own_head.token_ids)
    assert not torch.equal(second.layers[0].mlp.down_proj.weight, first.layers[0].mlp.down_proj.weight)
    weights = json.loads((tmp_path / "first" / "stage.json").read_text())["weights"]
    assert report["init_head"]["weights"] == weights and report["config"]["init"] == str(tmp_path / "first")

    with pytest.raises(ConfigError, match=r"layers=\(0, 1, -1\).*\(0, -1\)"):
        init_from_head(tmp_path / "first", target_model, attrs.evolve(cfg, layers=(0, -1)).head)
    with pytest.raises(ConfigError, match="sub_vocab=16.*32"):
        init_from_head(tmp_path / "first", target_model, attrs.evolve(cfg, sub_vocab=32).head)
    with pytest.raises(ConfigError, match="folder of a trained feature head"):
        FeatureTrainConfig(init=str(tmp_path / "base"))
