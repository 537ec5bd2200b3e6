"""dtype as an option, ``compile=auto`` as a measured choice per fed length (kept in a file and
measured again when the machine, torch or the model changes), every mode's logits against eager,
and the fair-baseline bookkeeping of the bench (identity within a dtype, speculation gains)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from pyramid_core.backends.hf import HFStage
from pyramid_core.backends.hf import choice as choice_mod
from pyramid_core.backends.hf.choice import (
    BUCKETS,
    MARGIN,
    ModeChoice,
    choice_key,
    choose_modes,
    fingerprint,
    measure,
)
from pyramid_core.backends.hf.runtime import native_dtype, packing_bf16_available
from pyramid_core.build import build_pipeline, make_stage
from pyramid_core.errors import ConfigError
from pyramid_core.options import ExecutionMode, dtype_word
from pyramid_core.types import Block, SamplingConfig

EAGER, FAST = ExecutionMode.EAGER, ExecutionMode.FAST
PROMPT = [3, 17, 5, 40, 22, 9, 31, 2]
# largest |logit difference| of a mode against eager, per dtype: float32 kernels differ in the
# order they sum in; bfloat16's 8-bit mantissa rounds each product (tiny logits are ~0.5 in size)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.06}


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed))


def _chain(tokens: list[int]) -> Block:
    return Block(torch.tensor(tokens), torch.zeros(len(tokens), 0))


def _tree(tokens: list[int], parents: list[int]) -> Block:
    return Block(torch.tensor(tokens), torch.zeros(len(tokens), 0), parents=torch.tensor(parents))


# --- the measured choice ---------------------------------------------------------------------

def test_measure_keeps_the_fastest_mode_per_bucket_and_eager_within_the_margin() -> None:
    # fast is 10% faster at M <= 2, 1% faster at M = 4 (noise: eager kept), 20% slower above
    cost = {EAGER: dict.fromkeys(BUCKETS, 1.0), FAST: {1: 0.9, 2: 0.9, 4: 0.99, 8: 1.2, 16: 1.2}}
    calls: list[tuple[ExecutionMode, int]] = []

    def timer(mode: ExecutionMode, m: int) -> float:
        calls.append((mode, m))
        return cost[mode][m]

    got = measure(timer, (EAGER, FAST), repeats=3)
    assert got.modes == ((1, FAST), (2, FAST), (4, EAGER), (8, EAGER), (16, EAGER))
    assert [got.mode_for(m) for m in (1, 2, 3, 4, 9, 16, 40)] == [FAST, FAST, EAGER, EAGER, EAGER, EAGER, EAGER]
    assert got.summary() == "fast up to M=2, eager above" and got.distinct == (FAST, EAGER)
    assert got.ms["fast"][8] == pytest.approx(1200.0) and not got.cached
    # warm-up, then interleaved: every bucket alternates between the modes
    assert len(calls) == 2 * len(BUCKETS) * 4 and calls[10:12] == [(EAGER, 1), (FAST, 1)]
    assert 0 < MARGIN < 0.1
    back = ModeChoice.from_json(json.loads(json.dumps(got.to_json())))
    assert back.modes == got.modes and back.ms == got.ms and back.cached
    with pytest.raises(ValueError, match="concrete modes"):
        ModeChoice.from_json({"modes": [[1, "auto"]]})


def test_the_compiled_mode_is_chosen_for_every_bucket_or_none() -> None:
    compiled = ExecutionMode.COMPILED
    # compiled wins M = 1 only, by little: the eager/fast mix is cheaper overall, compiled is dropped
    cost = {EAGER: dict.fromkeys(BUCKETS, 1.0), FAST: dict.fromkeys(BUCKETS, 0.8), compiled: {1: 0.7, 2: 0.9, 4: 0.9,
                                                                                            8: 0.9, 16: 0.9}}
    got = measure(lambda mode, m: cost[mode][m], (EAGER, FAST, compiled), repeats=1)
    assert got.distinct == (FAST,) and set(got.ms) == {"eager", "fast", "compiled"}
    cost[compiled] = dict.fromkeys(BUCKETS, 0.5)  # faster everywhere: every bucket
    assert measure(lambda mode, m: cost[mode][m], (EAGER, FAST, compiled), repeats=1).distinct == (compiled,)


def test_auto_times_the_compiled_mode_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyramid_core.backends.hf.runtime import (
        AUTO_COMPILED_ENV,
        COMPILED_MIN_TORCH,
        measured_candidates,
        torch_release,
    )

    cpu = torch.device("cpu")
    monkeypatch.delenv(AUTO_COMPILED_ENV, raising=False)
    assert ExecutionMode.COMPILED not in measured_candidates(cpu, torch.float32)
    monkeypatch.setenv(AUTO_COMPILED_ENV, "1")
    asked = measured_candidates(cpu, torch.float32)
    assert (asked[-1] is ExecutionMode.COMPILED) == (torch_release() >= COMPILED_MIN_TORCH)
    assert ExecutionMode.COMPILED not in measured_candidates(torch.device("cuda"), torch.float32)
    assert choice_key("k", (EAGER, FAST)) != choice_key("k", (EAGER, FAST, ExecutionMode.COMPILED))


def test_an_auto_stage_that_chose_the_compiled_mode_runs_on_its_static_cache(
        tiny_models: dict[str, Any], choice_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyramid_core.backends.hf.runtime import (
        AUTO_COMPILED_ENV,
        COMPILED_MIN_TORCH,
        measured_candidates,
        torch_release,
    )

    monkeypatch.setenv(AUTO_COMPILED_ENV, "1")
    model, cpu = tiny_models["target"], torch.device("cpu")
    if torch_release() < COMPILED_MIN_TORCH:  # never a candidate where it is refused
        assert ExecutionMode.COMPILED not in measured_candidates(cpu, torch.float32)
        return
    key = choice_key(fingerprint(model, kind="hf", dtype=torch.float32, device=cpu, layers=2),
                     measured_candidates(cpu, torch.float32))
    choice_file.write_text(json.dumps({key: {"modes": [[b, "compiled"] for b in BUCKETS], "ms": {}}}))
    stage, eager = HFStage(model, name="auto", compile="auto"), HFStage(model, name="eager")
    assert stage.mode_summary == "compiled" and stage._static is not None and stage._static.compiled
    context = _ids(30)
    for block in (None, _chain([5, 9, 2]), _tree([4, 8, 1], [-1, -1, 0])):
        a, b = eager.score(context, block), stage.score(context, block)
        assert (a - b).abs().max() < TOLERANCE[torch.float32]


class _Counting:
    """Counts the times ``choice.measure`` runs (a choice measured, not read from the file)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.runs = 0
        real = choice_mod.measure

        def counted(*args: Any, **kwargs: Any) -> ModeChoice:
            self.runs += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(choice_mod, "measure", counted)


@pytest.fixture
def choice_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "modes.json"
    monkeypatch.setenv(choice_mod.CHOICE_ENV, str(path))
    return path


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the fast mode needs oneDNN")
def test_the_choice_is_kept_and_measured_again_when_machine_torch_or_model_change(
        tiny_models: dict[str, Any], choice_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _Counting(monkeypatch)
    model = tiny_models["target"]
    first = HFStage(model, name="t", compile="auto")
    assert counting.runs == 1 and first.choice is not None and not first.choice.cached
    assert set(first.choice.ms) == {"eager", "fast"} and first.mode is ExecutionMode.AUTO
    assert set(first.runners) == set(first.choice.distinct)  # modes never chosen are dropped
    assert first.cached_tokens == ()  # the probe's context is not left behind
    kept = json.loads(choice_file.read_text())
    assert len(kept) == 1
    again = HFStage(model, name="t", compile="auto")
    assert counting.runs == 1 and again.choice is not None and again.choice.cached
    assert again.choice.modes == first.choice.modes

    def key() -> str:
        return fingerprint(model, kind="hf", dtype=torch.float32, device=torch.device("cpu"), layers=2)

    before = key()
    monkeypatch.setattr(torch, "__version__", "99.0.0")  # another torch
    torch_key = key()
    assert torch_key != before
    HFStage(model, name="t", compile="auto")
    assert counting.runs == 2
    monkeypatch.setattr(choice_mod, "cpu_name", lambda: "Another CPU")  # another machine
    assert key() not in (before, torch_key)
    machine_key = key()
    monkeypatch.setattr(choice_mod, "REVISION", choice_mod.REVISION + 1)  # modes implemented differently
    assert key() not in (before, torch_key, machine_key)
    HFStage(model, name="t", compile="auto")
    assert counting.runs == 3
    from pyramid_core.backends.hf.tiny import perturbed

    HFStage(perturbed(model, seed=3, scale=0.01), name="t", compile="auto")  # another model (weights)
    assert counting.runs == 4
    HFStage(model, name="t", num_layers=1, compile="auto")  # another layer count
    assert counting.runs == 5 and len(json.loads(choice_file.read_text())) == 5
    choice_file.write_text("{not json")  # an unreadable file is measured over, and rewritten
    HFStage(model, name="t", compile="auto")
    assert counting.runs == 6 and len(json.loads(choice_file.read_text())) == 1


def test_a_kept_choice_naming_a_mode_no_longer_available_is_measured_again(choice_file: Path) -> None:
    choice_file.write_text(json.dumps({"k": {"modes": [[1, "fast"], [16, "eager"]], "ms": {}}}))
    runs = []
    got = choose_modes("k", lambda mode, m: runs.append(mode) or 1.0, (EAGER,))
    assert got.distinct == (EAGER,) and runs  # fast is not a candidate here
    assert choose_modes("k", lambda mode, m: 1.0, (EAGER,)).cached


def _mixed(model: Any, dtype: torch.dtype, choice_file: Path, name: str) -> HFStage:
    """An auto stage whose kept choice runs eager up to M = 2 and the fast mode above."""
    from pyramid_core.backends.hf.runtime import measured_candidates

    cpu = torch.device("cpu")
    key = choice_key(fingerprint(model, kind="hf", dtype=dtype, device=cpu, layers=int(model.config.num_hidden_layers)),
                     measured_candidates(cpu, dtype))
    data = json.loads(choice_file.read_text()) if choice_file.is_file() else {}
    data[key] = {"modes": [[1, "eager"], [2, "eager"], [4, "fast"], [8, "fast"], [16, "fast"]], "ms": {}}
    choice_file.write_text(json.dumps(data))
    stage = HFStage(model, name=name, compile="auto")
    assert stage.choice is not None and stage.choice.cached
    assert stage.mode_summary == "eager up to M=2, fast above" and not stage.compiled
    return stage


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the fast mode needs oneDNN")
@pytest.mark.parametrize("dtype", [
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not packing_bf16_available(), reason="oneDNN packs bfloat16 only with AVX-512 or AVX-NE-CONVERT: this CPU has "
        "no fast bfloat16 mode (its refusal: tests/test_compiled.py)")),
], ids=["float32", "bfloat16"])
def test_every_mode_scores_like_eager_with_rollback_and_trees(tiny_models: dict[str, Any], choice_file: Path,
                                                              dtype: torch.dtype) -> None:
    import copy

    model = copy.deepcopy(tiny_models["target"]).to(dtype)
    tol = TOLERANCE[dtype]
    eager = HFStage(model, name="eager")
    others = [HFStage(model, name="fast", compile="fast"), _mixed(model, dtype, choice_file, "auto")]
    assert others[0].compiled and others[0].dtype is dtype
    for stage in others:
        for s in (eager, stage):
            s.reset()
        context = _ids(40)
        for block in (None, _chain([5, 9, 2]), _chain(list(range(12))), _tree([4, 8, 1, 6], [-1, -1, 0, 0])):
            a, b = eager.score(context, block), stage.score(context, block)
            assert a.dtype == b.dtype == dtype and a.shape == b.shape
            assert (a.float() - b.float()).abs().max() <= tol, (stage.name, block)
            context = torch.cat([context, _ids(3, seed=len(context))])
        # roll back into the cache, then grow again: as a fresh stage in the same mode computes
        for cut in (30, 12):
            got = stage.score(context[:cut], _chain([1, 2, 3]))
            assert stage.cached_tokens == tuple(context[:cut].tolist()) + (1, 2, 3)
            assert (got.float() - eager.score(context[:cut], _chain([1, 2, 3])).float()).abs().max() <= tol
        # a tree, then the context follows one of its paths: the cache is compacted to it
        stage.reset()
        stage.score(context[:20], _tree([4, 8, 1, 6, 2, 9], [-1, -1, 0, 0, 2, 3]))
        follow = torch.cat([context[:20], torch.tensor([4, 1, 2, 7])])
        b = stage.score(follow)
        assert stage.cached_tokens[:23] == tuple(follow[:-1].tolist())
        eager.reset()
        assert (eager.score(follow).float() - b.float()).abs().max() <= tol


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the fast mode needs oneDNN")
def test_a_mixed_auto_pipeline_is_greedy_identical(tiny_models: dict[str, Any], choice_file: Path) -> None:
    target = _mixed(tiny_models["target"], torch.float32, choice_file, "target")
    draft = _mixed(tiny_models["near"], torch.float32, choice_file, "near")
    greedy = SamplingConfig.greedy()
    alone = build_pipeline([HFStage(tiny_models["target"], name="ref")], sampling=greedy,
                           stop_ids=[]).generate(PROMPT, 40).token_list
    for stages, tree in (([draft, target], None), ([draft, target], "tree:branching=2-2"), (["ngram", target], None)):
        pipe = build_pipeline(stages, ["exact"] * (len(stages) - 1), [4] * (len(stages) - 1), tree=tree,
                              sampling=greedy, stop_ids=[])
        assert pipe.generate(PROMPT, 40).token_list == alone, (stages, tree)


# --- dtype ------------------------------------------------------------------------------------

def test_dtype_auto_is_the_native_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyramid_core.backends.hf import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert native_dtype("cpu") is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert native_dtype("cpu") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert native_dtype("cuda") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert native_dtype("cuda") is torch.bfloat16
    assert [dtype_word(w) for w in ("bf16", "torch.float32", "FP16", "auto")] == ["bfloat16", "float32", "float16",
                                                                                  "auto"]
    with pytest.raises(ConfigError, match=r"dtype must be one of auto, float32, bfloat16, float16, got 'int8'"):
        dtype_word("int8")


def test_dtype_reaches_the_stage_and_a_spec_of_its_own_wins(tmp_path: Path) -> None:
    from pyramid_core.backends.hf.tiny import save_with_words, tiny_llama

    save_with_words(tiny_llama(4), tmp_path / "m")
    spec = f"hf:path={tmp_path / 'm'}"
    assert make_stage(spec, dtype="bf16").dtype is torch.bfloat16  # type: ignore[union-attr]
    assert make_stage(spec + ",dtype=float32", dtype="bfloat16").dtype is torch.float32  # type: ignore[union-attr]
    assert make_stage(spec, dtype="auto").dtype is native_dtype("cpu")  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="dtype must be one of"):
        make_stage(spec, dtype="int4")
    from pyramid_core.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--stage", spec, "--dtype", "double"])


def test_forward_weight_bytes_counts_what_a_decode_forward_reads(tiny_models: dict[str, Any]) -> None:
    from pyramid_core.backends.hf.layers import decoder_layers, forward_weight_bytes

    model = tiny_models["target"]
    _, _, layers = decoder_layers(model)
    every = sum(p.numel() * p.element_size() for p in model.parameters())
    layer = sum(p.numel() * p.element_size() for p in layers[1].parameters())
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embed
    skipped_embed = 0 if tied else embed.numel() * embed.element_size()
    assert forward_weight_bytes(model) == every - skipped_embed + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert forward_weight_bytes(model, 1) == forward_weight_bytes(model) - layer


# --- the bench's fair bookkeeping --------------------------------------------------------------

class _Logits:
    """A target whose next-token logits are fixed: token 1 leads token 2 by ``margin``."""

    name, vocab_size, device, dtype = "fixed", 4, torch.device("cpu"), torch.bfloat16

    def __init__(self, margin: float) -> None:
        self.margin = margin

    def score(self, context: torch.Tensor, block: Any = None) -> torch.Tensor:
        return torch.tensor([[0.0, 10.0, 10.0 - self.margin, 0.0]])


@pytest.mark.parametrize(("margin", "identical", "ties"), [(0.25, True, 1), (3.0, False, 0)])
def test_a_divergence_at_a_tie_of_the_dtype_is_not_a_mismatch(margin: float, identical: bool, ties: int) -> None:
    from pyramid_core.lab.bench.baselines import judge_identity
    from pyramid_core.lab.bench.identity import first_divergence
    from pyramid_core.lab.bench.report import BenchRow

    target: Any = _Logits(margin)
    assert first_divergence(target, [0], [1, 1], [1, 1]) is None
    d = first_divergence(target, [0], [1, 1, 3], [1, 2, 3])
    assert d is not None and d.position == 1 and d.margin == pytest.approx(margin) and d.tie is (margin < 0.5)
    short = first_divergence(target, [0], [1, 1], [1])  # one text stopped: never a tie
    assert short is not None and not short.tie and math.isinf(short.margin)
    assert first_divergence(target, [0], [1, 1], [1, 2], dtype=torch.float32).tie is False  # type: ignore[union-attr]
    row = BenchRow("r", "pyramid")
    judge_identity(row, target, [("a", [0], [1, 1]), ("b", [0], [1, 1])], [[1, 1], [1, 2]])
    assert row.identical is identical and len(row.ties) == ties and row.mismatched_prompts == ([] if ties else ["b"])
    if ties:
        assert row.ties[0].startswith("b@1")


def test_gains_are_over_the_same_frameworks_decoding_of_the_target() -> None:
    from pyramid_core.backends.hf.baseline import HF_GENERATE, HF_GENERATE_COMPILED
    from pyramid_core.lab.bench.report import TARGET_ALONE, BenchResult, BenchRow
    from pyramid_core.lab.bench.run import set_gains

    def row(label: str, framework: str, tps: float, **kw: Any) -> BenchRow:
        return BenchRow(label, framework, tokens=int(tps * 10), wall_s=10.0, **kw)

    rows = [row(HF_GENERATE, "hf", 20), row(HF_GENERATE_COMPILED, "hf", 25), row("HF assisted (draft, 4)", "hf", 30),
            row(TARGET_ALONE, "pyramid", 24), row("draft→target", "pyramid", 36, ties=["p1@3 (margin 0.1)"],
                                                   identical=True)]
    set_gains(rows)
    assert [r.gain for r in rows] == [None, None, pytest.approx(1.5), pytest.approx(1.0), pytest.approx(1.5)]
    for r in rows:
        r.speedup = r.tokens_per_s / 25
    text = BenchResult(rows, {"prompts": 1, "max_new_tokens": 8, "device": "cpu", "baseline": HF_GENERATE_COMPILED,
                              "dtype": "bfloat16", "cpu": "Some CPU", "modes": {"t": "fast"}}).to_markdown()
    assert "| speedup | gain |" in text and "| 1.44x | 1.50x |" in text
    assert "yes (1 at a tie)" in text and "dtype bfloat16" in text and "t: fast" in text
    assert "numerical tie of the dtype" in text and "CPU Some CPU" in text


def test_profile_times_every_mode_against_the_memory_floor(tmp_path: Path, choice_file: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from pyramid_core.backends.hf.tiny import save_with_words, tiny_llama
    from pyramid_core.cli import main

    save_with_words(tiny_llama(6), tmp_path / "m")
    assert main(["profile", "--stage", f"hf:path={tmp_path / 'm'}", "--widths", "1,4", "--context", "20",
                 "--repeats", "2", "--dtype", "float32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["stages"]
    assert data["bandwidth_gb_s"] > 0 and data["cpu"]
    run = data["run"]  # what the numbers belong to (lab.provenance)
    assert run["command"] == "pyramid profile" and run["arguments"]["widths"] == "1,4"
    assert run["versions"]["torch"] == torch.__version__ and run["versions"]["stages"][0]["dtype"] == "float32"
    modes = [r["mode"] for r in rows]
    if torch.backends.mkldnn.is_available():
        assert modes[0].startswith("auto: ") and sorted(modes[1:]) == ["eager", "fast"]
    for r in rows:
        assert r["dtype"] == "float32" and r["weight_bytes"] > 0 and r["floor_ms"] > 0
        assert r["over_floor"] == pytest.approx(r["ms"]["1"] / r["floor_ms"])
    assert main(["profile", "--stage", f"hf:path={tmp_path / 'm'}", "--widths", "1,4", "--context", "20",
                 "--repeats", "2", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "| floor ms | T(1)/floor |" in out and "| eager |" in out


def test_the_floor_of_a_feature_head_counts_the_head_and_the_lm_head_it_uses(tiny_models: dict[str, Any]) -> None:
    from pyramid_core.backends.hf.head import FeatureHead, FeatureHeadConfig
    from pyramid_core.backends.hf.head_stage import FeatureStage
    from pyramid_core.backends.hf.layers import forward_weight_bytes
    from pyramid_core.cli.profile import _floor_bytes

    model = tiny_models["target"]
    head = FeatureHead(model, FeatureHeadConfig(layers=(-1,), variant="eagle1"))
    own = sum(p.numel() * p.element_size() for p in [*head.parameters(), *head.buffers()])
    lm = model.get_output_embeddings().weight
    assert _floor_bytes(FeatureStage(head)) == own + lm.numel() * lm.element_size()
    assert _floor_bytes(HFStage(model)) == forward_weight_bytes(model)
