"""The Hugging Face backend on tiny random Llama models (seconds on a CPU).

Greedy identity: every pipeline must emit exactly the target's own ``model.generate`` greedy
tokens (docs/algorithms.md "Greedy mode"), for 2 and 3 stages, several block lengths, model and ngram drafts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pyramid_core import (
    Block,
    ConfigError,
    SamplingConfig,
    Stage,
    TokenizerMismatchError,
    build_pipeline,
    make_stage,
)
from pyramid_core.backends.hf import HFStage, truncate_layers
from pyramid_core.backends.hf.tiny import save_with_words, tiny_llama, word_tokenizer
from pyramid_core.plugins import registries

PROMPT = [3, 5, 7, 11, 13, 5, 7]
NEW = 40



def hf_greedy(model: Any, prompt: list[int], n: int = NEW, **kwargs: Any) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, **kwargs)
    return [int(t) for t in out[0, len(prompt) :]]


@pytest.fixture(scope="module")
def reference(tiny_models: dict[str, Any]) -> list[int]:
    return hf_greedy(tiny_models["target"], PROMPT)


def stages_of(names: list[str], models: dict[str, Any]) -> list[Any]:
    return [name if name == "ngram" else HFStage(models[name], name=name) for name in names]


CHAINS = [
    ["near", "target"],
    ["far", "target"],
    ["ngram", "target"],
    ["far", "near", "target"],
    ["ngram", "near", "target"],
]


@pytest.mark.parametrize("ell", [1, 3, 5])
@pytest.mark.parametrize("chain", CHAINS, ids="->".join)
def test_greedy_identity(chain: list[str], ell: int, tiny_models: dict[str, Any], reference: list[int]) -> None:
    stages = stages_of(chain, tiny_models)
    n = len(stages)
    pipe = build_pipeline(stages, ["exact"] * (n - 1), [ell] * (n - 1), sampling=SamplingConfig.greedy(), stop_ids=[])
    gen = pipe.generate(PROMPT, max_new_tokens=NEW)
    assert gen.token_list == reference
    assert gen.metrics.target_forwards <= NEW


def test_greedy_identity_mixed_block_lengths(tiny_models: dict[str, Any], reference: list[int]) -> None:
    stages = stages_of(["near", "near", "target"], tiny_models)
    pipe = build_pipeline(stages, ["exact", "exact"], [2, 7], sampling=SamplingConfig.greedy(), stop_ids=[])
    assert pipe.generate(PROMPT, max_new_tokens=NEW).token_list == reference


def test_near_draft_is_accepted_sometimes(tiny_models: dict[str, Any]) -> None:
    """The identity tests above exercise both acceptance and rollback, not only rejections."""
    stages = stages_of(["near", "target"], tiny_models)
    pipe = build_pipeline(stages, ["exact"], [3], sampling=SamplingConfig.greedy(), stop_ids=[])
    rate = pipe.generate(PROMPT, max_new_tokens=NEW).metrics.boundaries[0].acceptance_rate
    assert 0.3 < rate < 1.0


@pytest.mark.parametrize("chain", [["near", "target"], ["ngram", "target"], ["far", "near", "target"]], ids="->".join)
@pytest.mark.parametrize("ell", [1, 4])
def test_stops_after_eos_where_hf_does(chain: list[str], ell: int, tiny_models: dict[str, Any], reference: list[int]) -> None:
    # a token the target first emits at position >= 10: HF stops right after it
    eos = next(t for i, t in enumerate(reference) if i >= 10 and t not in reference[:i])
    expected = hf_greedy(tiny_models["target"], PROMPT, eos_token_id=eos, pad_token_id=eos)
    assert expected[-1] == eos and len(expected) < NEW
    stages = stages_of(chain, tiny_models)
    n = len(stages)
    pipe = build_pipeline(stages, ["exact"] * (n - 1), [ell] * (n - 1), sampling=SamplingConfig.greedy(), stop_ids=[eos])
    assert pipe.generate(PROMPT, max_new_tokens=NEW).token_list == expected


# --- KV cache ------------------------------------------------------------------------------


def plain_kv(model: Any, ids: list[int]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Logits and per-layer (keys, values) of one uncached forward over ``ids``."""
    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=True)
    cache = out.get("cache")
    cache = cache if cache is not None else out.get("past_key_values")
    return out.logits[0], [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def assert_kv_equal(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    assert len(a) == len(b) > 0
    for (ka, va), (kb, vb) in zip(a, b, strict=True):
        assert ka.shape == kb.shape
        torch.testing.assert_close(ka, kb, atol=1e-5, rtol=0)
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=0)


def chain(tokens: list[int], vocab: int = 64) -> Block:
    t = torch.tensor(tokens, dtype=torch.long)
    return Block(t, torch.nn.functional.one_hot(t, vocab).float())


def test_kv_cache_after_rollback_equals_fresh_recompute(tiny_models: dict[str, Any]) -> None:
    model = tiny_models["target"]
    stage = HFStage(model)
    context = [4, 8, 15, 16, 23, 42]
    stage.score(torch.tensor(context))
    rows = stage.score(torch.tensor(context), chain([1, 2, 3, 9, 10]))
    assert stage.cached_tokens == tuple(context + [1, 2, 3, 9, 10])
    logits, _ = plain_kv(model, context + [1, 2, 3, 9, 10])
    torch.testing.assert_close(rows, logits[len(context) - 1 :], atol=1e-5, rtol=0)

    # roll back: keep context + [1, 2], then diverge with [7]; and a shorter context than cached
    prefix = context + [1, 2, 7]
    rows = stage.score(torch.tensor(prefix))
    logits, kv = plain_kv(model, prefix)
    torch.testing.assert_close(rows, logits[-1:], atol=1e-5, rtol=0)
    # the cache holds everything but the last position, whose logits were asked for ...
    assert stage.cached_tokens == tuple(prefix)
    assert_kv_equal(stage.kv_state(), kv)
    fresh = HFStage(model)
    fresh.score(torch.tensor(prefix))
    assert_kv_equal(stage.kv_state(), fresh.kv_state())

    # ... and a context that is a strict prefix of the cache re-feeds only its last token
    rows = stage.score(torch.tensor(context[:3]), chain([30]))
    logits, kv = plain_kv(model, context[:3] + [30])
    torch.testing.assert_close(rows, logits[2:], atol=1e-5, rtol=0)
    assert_kv_equal(stage.kv_state(), kv)

    stage.reset()
    assert stage.cached_tokens == () and stage.kv_state() == []


def test_score_rows_follow_the_row_convention(tiny_models: dict[str, Any]) -> None:
    model = tiny_models["far"]
    stage = HFStage(model)
    ctx, blk = [1, 2, 3], [4, 5]
    rows = stage.score(torch.tensor(ctx), chain(blk))
    assert rows.shape == (3, 64)
    for i in range(3):  # row i: after ctx + blk[:i], each computed from scratch
        expected = HFStage(model).score(torch.tensor(ctx + blk[:i]))[0]
        torch.testing.assert_close(rows[i], expected, atol=1e-5, rtol=0)
    assert stage.score(torch.tensor(ctx), chain([])).shape == (1, 64)


def test_stage_protocol_and_attributes(tiny_models: dict[str, Any]) -> None:
    stage = HFStage(tiny_models["target"])
    assert isinstance(stage, Stage)
    assert stage.vocab_size == 64 and stage.device == torch.device("cpu") and stage.tokenizer is None
    with pytest.raises(ValueError, match="empty"):
        stage.score(torch.tensor([], dtype=torch.long))


# --- padded vocabulary ---------------------------------------------------------------------


def test_padded_vocab_columns_are_ignored() -> None:
    """Embedding matrix of 72 rows, tokenizer of 64 tokens: the 8 padding logits are made the
    largest everywhere, yet greedy decoding matches HF restricted to the first 64 columns."""
    model = tiny_llama(5, vocab_size=72)
    head = torch.nn.Linear(model.config.hidden_size, 72, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[64:] = 1e4
    model.lm_head = head
    tok = word_tokenizer([f"w{i}" for i in range(64)])
    assert len(tok) == 64
    with torch.inference_mode():
        assert bool((model(torch.tensor([PROMPT])).logits[0].argmax(-1) >= 64).all())  # the trap is armed

    expected = hf_greedy(model, PROMPT, suppress_tokens=list(range(64, 72)))
    assert max(expected) < 64
    for chain_ in ([model], [HFStage(model, tok, name="d"), HFStage(model, tok)], ["ngram", HFStage(model, tok)]):
        stages: list[Any] = [HFStage(model, tok) if isinstance(s, torch.nn.Module) else s for s in chain_]
        assert isinstance(stages[-1], HFStage) and stages[-1].vocab_size == 64
        n = len(stages)
        pipe = build_pipeline(stages, ["exact"] * (n - 1), [3] * (n - 1), sampling=SamplingConfig.greedy(), stop_ids=[])
        assert pipe.generate(PROMPT, max_new_tokens=NEW).token_list == expected
    # sampling rows never put mass on padding either
    rows = SamplingConfig(temperature=1.0).transform(HFStage(model, tok).score(torch.tensor(PROMPT)))
    assert rows.shape == (1, 64)
    torch.testing.assert_close(rows.sum(-1), torch.ones(1))


def test_vocab_size_larger_than_the_model_is_an_error() -> None:
    model = tiny_llama(6, vocab_size=64)
    with pytest.raises(ValueError, match="does not fit the model's 64 logit columns"):
        HFStage(model, word_tokenizer([f"w{i}" for i in range(80)]), name="x")


# --- tokenizers ----------------------------------------------------------------------------


def test_mismatched_tokenizers_fail_before_decoding(tiny_models: dict[str, Any]) -> None:
    tok_a = word_tokenizer([f"w{i}" for i in range(64)])
    tok_b = word_tokenizer([f"w{i}" for i in range(63)] + ["other"])
    draft = HFStage(tiny_models["near"], tok_a, name="draft-a")
    target = HFStage(tiny_models["target"], tok_b, name="target-b")
    with pytest.raises(TokenizerMismatchError, match="draft-a|target-b"):
        build_pipeline([draft, target], ["exact"], [3], sampling=SamplingConfig.greedy())
    assert draft.cached_tokens == () and target.cached_tokens == ()  # nothing was decoded
    # the same vocabulary in two tokenizer objects is fine
    same = HFStage(tiny_models["near"], word_tokenizer([f"w{i}" for i in range(63)] + ["other"]))
    build_pipeline([same, target], ["exact"], [3], sampling=SamplingConfig.greedy())


# --- layer truncation ----------------------------------------------------------------------


def test_truncated_draft_shares_weights_and_leaves_the_model_alone() -> None:
    model = tiny_llama(7, num_layers=3)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        before = model(ids).logits
        hidden = model(ids, output_hidden_states=True).hidden_states[1]  # after decoder layer 1
        expected = model.lm_head(model.model.norm(hidden))[0, -1]
    draft = HFStage(model, num_layers=1)
    assert draft.num_layers == 1 and draft.name.endswith("[:1]")
    torch.testing.assert_close(draft.score(torch.tensor(PROMPT))[0], expected, atol=1e-5, rtol=0)
    assert draft.model.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, before)
    assert len(truncate_layers(model, 2).model.layers) == 2
    with pytest.raises(ValueError, match=r"num_layers must be in 1\.\.3"):
        truncate_layers(model, 4)


def test_truncated_draft_in_a_pipeline_is_lossless(tiny_models: dict[str, Any]) -> None:
    model = tiny_llama(8, num_layers=4)
    expected = hf_greedy(model, PROMPT)
    stages: list[Any] = ["ngram", HFStage(model, num_layers=2), HFStage(model)]
    pipe = build_pipeline(stages, ["exact", "exact"], [2, 4], sampling=SamplingConfig.greedy(), stop_ids=[])
    assert pipe.generate(PROMPT, max_new_tokens=NEW).token_list == expected


# --- backends registry ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    save_with_words(tiny_llama(9, num_layers=2), path)
    return path


def test_backends_are_registered() -> None:
    backends = registries().backends
    assert {"hf", "smollm2"} <= set(backends.names())
    assert backends.get("hf").plugin == "hf"


def test_hf_backend_from_spec(saved_tiny: Path) -> None:
    draft = make_stage(f"hf:path={saved_tiny},num_layers=1", dtype="float32")  # the spec's own dtype= would win
    target = make_stage(f"hf:path={saved_tiny},dtype=float32,device=cpu")
    assert isinstance(draft, HFStage) and isinstance(target, HFStage)
    assert (draft.num_layers, target.num_layers) == (1, 2)
    assert draft.name == "tiny-llama[:1]" and target.name == "tiny-llama"
    assert draft.tokenizer is not None and draft.vocab_size == 64
    # loaded once: the truncated draft shares the target's weights
    assert draft.model.lm_head.weight.data_ptr() == target.model.lm_head.weight.data_ptr()
    assert draft.score(torch.tensor([1, 2, 3])).shape == (1, 64)
    pipe = build_pipeline([f"hf:path={saved_tiny},num_layers=1", f"hf:path={saved_tiny}"], ["exact"], [3],
                          sampling=SamplingConfig.greedy(), dtype="float32")
    assert pipe.stop_ids == []  # the saved tokenizer has no EOS token
    with torch.inference_mode():
        expected = hf_greedy(target.model, PROMPT, n=12)
    assert pipe.generate(PROMPT, max_new_tokens=12).token_list == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hf:path={p},nlayers=1", "no parameter 'nlayers'; did you mean 'num_layers'"),
        ("hf:path={p},num_layers=x", "num_layers='x' is not a valid"),
        ("hf:path={p},num_layers=9", r"num_layers must be in 1\.\.2"),
        ("hf:path={p},dtype=float8", "unknown dtype 'float8'"),
        ("hf:path={p}/missing", "not a Hugging Face model directory"),
        ("hff:path={p}", "did you mean 'hf'"),
    ],
)
def test_hf_backend_errors_are_clear(spec: str, message: str, saved_tiny: Path) -> None:
    with pytest.raises(Exception, match=message) as info:
        make_stage(spec.format(p=saved_tiny))
    assert isinstance(info.value, (ConfigError, LookupError))


def test_smollm2_backend_without_setup_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYRAMID_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="pyramid setup"):
        make_stage("smollm2")


# every device this machine has: CPU always, CUDA where present (never a skip)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", [None, "sd", "psd-a", "psd-f", "tree"])
def test_greedy_identity_on_each_device(tiny_models: dict[str, Any], device: str, preset: str | None) -> None:
    """Every lossless configuration (and psd-f, lossless under greedy one-hot rows) reproduces
    the target's greedy output on every device, with its tokens left on that device."""
    import copy

    target = copy.deepcopy(tiny_models["target"]).to(device)
    draft = copy.deepcopy(tiny_models["near"]).to(device)
    expected = hf_greedy(target, PROMPT)  # on-device reference (kernels may differ from CPU)
    greedy = SamplingConfig.greedy()
    if preset is None:
        pipe = build_pipeline(["ngram", HFStage(draft), HFStage(target)], ["exact", "exact"], [2, 3], sampling=greedy,
                              stop_ids=[])
    elif preset == "tree":
        pipe = build_pipeline([HFStage(draft), HFStage(target)], ["exact"], [3], sampling=greedy, stop_ids=[],
                              tree="tree:branching=3-2-1")
    else:  # a 3-stage preset: an unrelated draft below the near one
        far = copy.deepcopy(tiny_models["far"]).to(device)
        pipe = build_pipeline([HFStage(far), HFStage(draft), HFStage(target)], preset=preset, block_lengths=[2, 3],
                              sampling=greedy, stop_ids=[])
    gen = pipe.generate(PROMPT, max_new_tokens=NEW)
    assert gen.tokens.device.type == device
    assert gen.token_list == expected


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_chain_runs_on_each_device(tiny_models: dict[str, Any], device: str) -> None:
    import copy

    target = copy.deepcopy(tiny_models["target"]).to(device)
    draft = copy.deepcopy(tiny_models["near"]).to(device)
    pipe = build_pipeline(["ngram", HFStage(draft), HFStage(target)], ["exact", "exact"], [2, 3],
                          sampling=SamplingConfig(temperature=0.9), stop_ids=[])
    a, b = pipe.generate(PROMPT, max_new_tokens=24, seed=3), pipe.generate(PROMPT, max_new_tokens=24, seed=3)
    assert a.tokens.device.type == device and len(a.token_list) == 24
    assert a.token_list == b.token_list  # seeded: the same draws on the same device
    assert all(0 <= t < target.config.vocab_size for t in a.token_list)




@pytest.mark.parametrize("device", DEVICES)
def test_make_stage_places_backends_and_leaves_proposers(saved_tiny: Path, device: str) -> None:
    from pyramid_core.build import make_stage

    stage = make_stage(f"hf:path={saved_tiny}", device=device)
    assert isinstance(stage, HFStage) and stage.device.type == device
    assert not isinstance(make_stage("ngram", device=device, vocab_size=64), HFStage)  # no device for a proposer
    assert isinstance(make_stage(f"hf:path={saved_tiny}", device=None), HFStage)


@pytest.mark.parametrize("device", DEVICES)
def test_generate_cli_puts_every_model_stage_on_the_device(saved_tiny: Path, device: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from pyramid_core import build
    from pyramid_core.cli import main

    built: list[Any] = []
    real = build.make_stage

    def spy(*args: Any, **kw: Any) -> Any:
        built.append(real(*args, **kw))
        return built[-1]

    monkeypatch.setattr(build, "make_stage", spy)
    spec = f"hf:path={saved_tiny}"
    argv = ["generate", "--stage", "ngram", "--stage", f"{spec},num_layers=1", "--stage", spec, "--device", device,
            "--prompt", "w3 w5 w7", "--max-new-tokens", "4", "--no-chat"]
    assert main(argv) == 0
    models = [s for s in built if isinstance(s, HFStage)]
    assert len(models) == 2 and all(s.device.type == device for s in models)
