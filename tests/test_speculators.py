"""EAGLE-3 heads in the speculators format (``backends.hf.speculators``): export, import, the
round trip, and the layout checked against an independent implementation of vLLM's EAGLE-3
forward (written here from the format's description, not through pyramid's head)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyramid_core import build_pipeline
from pyramid_core.backends.hf.head import FeatureHead, FeatureHeadConfig
from pyramid_core.backends.hf.head_stage import FeatureStage, load_feature_stage
from pyramid_core.backends.hf.speculators import (
    export_speculators,
    is_speculators_dir,
    load_speculators_head,
    vllm_aux_layers,
)
from pyramid_core.backends.hf.stage import HFStage
from pyramid_core.backends.hf.tiny import tiny_llama
from pyramid_core.errors import ConfigError
from pyramid_core.types import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)
LAYERS = 4  # the tiny target's decoder layers: pyramid feature layers 0..2, vLLM aux ids 1..3


@pytest.fixture(scope="module")
def target() -> Any:
    return tiny_llama(0, num_layers=LAYERS)


def _head(base: Any, *, layers: tuple[int, ...] = (2, 0), sub_vocab: int = 0, depth: int = 1,
          norm_before_residual: bool = False, seed: int = 0) -> FeatureHead:
    cfg = FeatureHeadConfig(layers=layers, variant="eagle3", depth=depth, sub_vocab=sub_vocab,
                            norm_before_residual=norm_before_residual)
    ids = torch.arange(0, 2 * sub_vocab, 2) if sub_vocab else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = FeatureHead(base, cfg, ids)
        with torch.no_grad():  # norms away from 1, so a swapped norm shows
            for name, p in head.named_parameters():
                if p.dim() == 1 and name.endswith("weight"):
                    p.uniform_(0.5, 1.5)
    return head.eval()


def _slots(head: FeatureHead, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every slot: the head reads the fused feature of the position before each."""
    u = head.fuse_features(features)
    u_prev = torch.cat([torch.zeros_like(u[:, :1]), u[:, :-1]], dim=1)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        return head.logits(head.slots(u_prev, ids, positions))


def _inputs(head: FeatureHead, n: int = 9, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, n, head.feature_width, generator=g), torch.randint(0, 64, (1, n), generator=g))


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _vllm_eagle3(folder: Path, target: Any, aux_states: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """vLLM's EAGLE-3 draft forward (one decoder layer, causal, no cache) from the checkpoint's
    own tensors: fc over the auxiliary states in increasing id order, layer 0 attending over
    [input_layernorm(embedding) ; hidden_norm(feature)], the residual from the feature, and the
    final norm before the LM head (the target's when the head has none; d2t maps draft ids)."""
    cfg = json.loads((folder / "config.json").read_text())
    w = load_file(str(folder / "model.safetensors"))
    layer = cfg["transformer_layer_config"]
    eps, heads = layer["rms_norm_eps"], layer["num_attention_heads"]
    hidden = torch.cat(aux_states, dim=-1) @ w["fc.weight"].T
    u_prev = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)
    embed = target.get_input_embeddings()(ids)
    normed = _rms(u_prev, w["layers.0.hidden_norm.weight"], eps)
    residual = normed if cfg["norm_before_residual"] else u_prev
    x = torch.cat([_rms(embed, w["layers.0.input_layernorm.weight"], eps), normed], dim=-1)
    t, d = ids.shape[1], layer["hidden_size"] // heads

    def split(y: torch.Tensor) -> torch.Tensor:
        return y.view(1, t, heads, d).transpose(1, 2)

    q, k, v = (split(x @ w[f"layers.0.self_attn.{n}_proj.weight"].T) for n in "qkv")
    cos, sin = target.model.rotary_emb(x, torch.arange(t).unsqueeze(0))
    q, k = _rotate(q, cos[:, None], sin[:, None]), _rotate(k, cos[:, None], sin[:, None])
    att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    h = residual + att.transpose(1, 2).reshape(1, t, -1) @ w["layers.0.self_attn.o_proj.weight"].T
    m = _rms(h, w["layers.0.post_attention_layernorm.weight"], eps)
    mlp = torch.nn.functional.silu(m @ w["layers.0.mlp.gate_proj.weight"].T) * (m @ w["layers.0.mlp.up_proj.weight"].T)
    h = h + mlp @ w["layers.0.mlp.down_proj.weight"].T
    out = _rms(h, w["norm.weight"], eps)
    if "lm_head.weight" not in w:
        return out @ target.get_output_embeddings().weight.T
    sub = out @ w["lm_head.weight"].T
    full = torch.full((1, t, target.config.vocab_size), float("-inf"))
    full[..., torch.arange(sub.shape[-1]) + w["d2t"]] = sub
    return full


@pytest.mark.parametrize("sub_vocab,norm_before_residual", [(0, False), (16, True)])
def test_the_exported_layout_computes_what_vllm_computes(target: Any, tmp_path: Path, sub_vocab: int,
                                                         norm_before_residual: bool) -> None:
    head = _head(target, sub_vocab=sub_vocab, norm_before_residual=norm_before_residual)
    folder = export_speculators(head, tmp_path / "spec", verifier="tiny", k=4)
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states = target(ids, output_hidden_states=True).hidden_states  # [embeddings, layer 0 out, ...]
        cfg = json.loads((folder / "config.json").read_text())
        aux = cfg["eagle_aux_hidden_state_layer_ids"]
        assert aux == [1, 3]  # pyramid's layers (2, 0) -> vLLM's ids, increasing
        want = _vllm_eagle3(folder, target, [states[a] for a in aux], ids)
        features = torch.cat([states[i + 1] for i in head.cfg.layers], dim=-1)  # pyramid's order (2, 0)
        got = _slots(head, features, ids)
    finite = torch.isfinite(want)
    assert torch.equal(finite, got > torch.finfo(got.dtype).min)
    assert torch.allclose(got[finite], want[finite], atol=1e-4)


def test_export_writes_what_vllms_loader_reads(target: Any, tmp_path: Path) -> None:
    folder = export_speculators(_head(target, sub_vocab=16, depth=2), tmp_path / "spec", verifier="org/tiny",
                                base="/models/tiny", k=5)
    assert is_speculators_dir(folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3" and cfg["draft_vocab_size"] == 16
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 5
    assert cfg["speculators_config"]["verifier"]["name_or_path"] == "org/tiny"
    assert cfg["transformer_layer_config"]["num_hidden_layers"] == 2
    assert cfg["transformer_layer_config"]["tie_word_embeddings"] is False
    assert cfg["pyramid"]["base"] == "/models/tiny"
    w = load_file(str(folder / "model.safetensors"))
    assert w["layers.0.self_attn.q_proj.weight"].shape == (32, 64)  # layer 0 reads 2H
    assert w["layers.1.self_attn.q_proj.weight"].shape == (32, 32)
    assert "layers.0.hidden_norm.weight" in w and "layers.1.hidden_norm.weight" not in w
    assert w["fc.weight"].shape == (32, 64)
    assert torch.equal(torch.arange(16) + w["d2t"], torch.arange(0, 32, 2))
    assert int(w["t2d"].sum()) == 16 and bool(w["t2d"][2]) and not bool(w["t2d"][1])
    assert not any(n.startswith(("embed_tokens", "rotary")) for n in w)


@pytest.mark.parametrize("sub_vocab,depth", [(0, 1), (16, 2)])
def test_round_trip_gives_the_same_head(target: Any, tmp_path: Path, sub_vocab: int, depth: int) -> None:
    head = _head(target, sub_vocab=sub_vocab, depth=depth)
    folder = export_speculators(head, tmp_path / "spec", verifier="tiny")
    back = load_speculators_head(folder, target)
    assert back.cfg == FeatureHeadConfig(layers=(0, 2), variant="eagle3", depth=depth, sub_vocab=sub_vocab)
    features, ids = _inputs(head)
    # the imported head reads its layers in increasing order: the same features, reordered
    swapped = torch.cat([features[..., 32:], features[..., :32]], dim=-1)
    assert torch.allclose(_slots(head, features, ids), _slots(back, swapped, ids), atol=1e-5, rtol=0)  # fc sums in another order
    # and exporting it again writes the same tensors
    again = export_speculators(back, tmp_path / "again", verifier="tiny")
    a, b = load_file(str(folder / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_an_imported_head_drafts_in_a_pipeline_greedy_identical(target: Any, tmp_path: Path) -> None:
    """``feature:path=DIR`` (here ``load_feature_stage``) takes a speculators folder; its target
    from ``base=``; the chain emits the target's greedy output."""
    tdir = tmp_path / "target"
    target.save_pretrained(tdir)
    folder = export_speculators(_head(target), tmp_path / "spec", verifier=str(tdir))
    want = build_pipeline([HFStage(target)], sampling=GREEDY, stop_ids=[]).generate([1, 5, 9], 16).token_list
    for base in (None, str(tdir)):  # from the verifier recorded in the folder, then given
        stage = load_feature_stage(str(folder), base=base)
        assert isinstance(stage, FeatureStage) and stage.head.cfg.layers == (0, 2)
        pipe = build_pipeline([stage, HFStage(stage.head.base)], ["exact"], [3], sampling=GREEDY, stop_ids=[])
        out = pipe.generate([1, 5, 9], 16)
        assert out.token_list == want and out.metrics.boundaries[0].proposed > 0


def test_published_names_load(target: Any, tmp_path: Path) -> None:
    """Checkpoints in the wild: ``midlayer.`` for layer 0 (EAGLE-3's own code), a ``model.``
    prefix, a copy of the target's embedding, weights in shards with an index, no
    ``norm_before_residual`` (vLLM's default: true)."""
    head = _head(target, sub_vocab=16, norm_before_residual=True)
    folder = export_speculators(head, tmp_path / "spec", verifier="tiny")
    w = load_file(str(folder / "model.safetensors"))
    renamed = {("model." + n.replace("layers.0.", "midlayer.")): v for n, v in w.items()}
    renamed["embed_tokens.weight"] = target.get_input_embeddings().weight.detach().clone()
    (folder / "model.safetensors").unlink()
    names = sorted(renamed)
    save_file({n: renamed[n] for n in names[:5]}, str(folder / "a.safetensors"))
    save_file({n: renamed[n] for n in names[5:]}, str(folder / "b.safetensors"))
    index = {"weight_map": {n: "a.safetensors" if i < 5 else "b.safetensors" for i, n in enumerate(names)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["norm_before_residual"], cfg["pyramid"]
    (folder / "config.json").write_text(json.dumps(cfg))
    back = load_speculators_head(folder, target)
    assert back.cfg.norm_before_residual
    features, ids = _inputs(head)
    swapped = torch.cat([features[..., 32:], features[..., :32]], dim=-1)
    assert torch.allclose(_slots(head, features, ids), _slots(back, swapped, ids), atol=1e-5, rtol=0)  # fc sums in another order


def test_what_cannot_be_exported_or_imported_is_named(target: Any, tmp_path: Path) -> None:
    eagle1 = FeatureHead(target, FeatureHeadConfig())
    with pytest.raises(ValueError, match="only an EAGLE-3 head.*this head is eagle1"):
        export_speculators(eagle1, tmp_path / "x", verifier="tiny")
    normed = _head(target, layers=(0, -1))
    with pytest.raises(ValueError, match=r"reads target layer -1.*--layers 1,1,0"):
        export_speculators(normed, tmp_path / "x", verifier="tiny")
    assert vllm_aux_layers(30) == (2, 15, 27)
    folder = export_speculators(_head(target), tmp_path / "spec", verifier="tiny")
    good = json.loads((folder / "config.json").read_text())

    def load_with(**change: Any) -> None:
        (folder / "config.json").write_text(json.dumps(good | change))
        load_speculators_head(folder, target)

    with pytest.raises(ValueError, match="of type 'dflash'; pyramid imports 'eagle3'"):
        load_with(speculators_model_type="dflash")
    with pytest.raises(ValueError, match="norm_before_fc=true is a variant"):
        load_with(norm_before_fc=True)
    with pytest.raises(ValueError, match=r"auxiliary layers \[0, 4\] have no pyramid feature layer"):
        load_with(eagle_aux_hidden_state_layer_ids=[0, 2, 4])
    with pytest.raises(ValueError, match="target_hidden_size=64, but the target's hidden size is 32"):
        load_with(target_hidden_size=64)
    with pytest.raises(ValueError, match=r"fuse.weight has shape \[32, 64\], the config says \[32, 96\]"):
        load_with(eagle_aux_hidden_state_layer_ids=[1, 2, 3])  # fc's width says two layers
    (folder / "config.json").write_text(json.dumps(good))
    w = load_file(str(folder / "model.safetensors"))
    w["embed_tokens.weight"] = torch.randn(64, 32)
    save_file(w, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="an embedding of its own"):
        load_speculators_head(folder, target)


def test_the_feature_plugin_names_a_folder_without_a_head(tmp_path: Path) -> None:
    from pyramid_plugins.feature import feature_stage

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no feature head .*no speculators config.json"):
        feature_stage(path=str(tmp_path))
    with pytest.raises(ConfigError, match="give path=DIR"):
        feature_stage()


def test_pyramid_distill_export_writes_a_folder_that_reads_back(target: Any, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from pyramid_core.backends.hf.head import save_feature_head
    from pyramid_core.cli import main

    tdir = tmp_path / "target"
    target.save_pretrained(tdir)
    head = _head(target, sub_vocab=16)
    save_feature_head(head, tmp_path / "head", base=str(tdir), dtype=torch.float32)
    assert main(["distill", "export", str(tmp_path / "head"), "--out", str(tmp_path / "spec"), "--k", "5"]) == 0
    assert '"method": "eagle3"' in capsys.readouterr().out
    cfg = json.loads((tmp_path / "spec" / "config.json").read_text())
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 5
    assert cfg["speculators_config"]["verifier"]["name_or_path"] == str(tdir)
    back = load_feature_stage(str(tmp_path / "spec")).head
    features, ids = _inputs(head)
    swapped = torch.cat([features[..., 32:], features[..., :32]], dim=-1)
    assert torch.allclose(_slots(head, features, ids), _slots(back, swapped, ids), atol=1e-5, rtol=0)
    # refused, naming why: a folder that is not empty, an EAGLE-1 head
    assert main(["distill", "export", str(tmp_path / "head"), "--out", str(tmp_path / "spec")]) != 0
    assert "is not empty; give a new folder" in capsys.readouterr().err
    save_feature_head(FeatureHead(target, FeatureHeadConfig()), tmp_path / "eagle1", base=str(tdir))
    assert main(["distill", "export", str(tmp_path / "eagle1"), "--out", str(tmp_path / "out1")]) != 0
    assert "only an EAGLE-3 head" in capsys.readouterr().err


def test_the_engine_bench_measures_the_head_in_pyramid_as_vllm_counts(target: Any, tmp_path: Path) -> None:
    """``serving.bench``'s pyramid side of the head comparison: 1 + accepted / verifications at
    the top boundary, and the target's greedy outputs."""
    from pyramid_core.serving.bench import pyramid_head_run

    tdir = tmp_path / "target"
    target.save_pretrained(tdir)
    folder = export_speculators(_head(target), tmp_path / "spec", verifier=str(tdir))
    prompts = [[1, 5, 9], [2, 4, 6, 8]]
    got = pyramid_head_run(str(folder), str(tdir), "float32", prompts, 12, k=3)
    want = []
    for p in prompts:  # the target's greedy continuation, token by token
        seq = list(p)
        with torch.inference_mode():
            for _ in range(12):
                seq.append(int(target(torch.tensor([seq])).logits[0, -1].argmax()))
        want.append(seq[len(p):])
    assert got["outputs"] == want
    assert got["verifications"] > 0
    assert got["accept_length"] == pytest.approx(1 + got["accepted"] / got["verifications"])
    assert 1 <= got["accept_length"] <= 4
