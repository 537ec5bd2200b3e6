"""Budgeted presets (``pyramid_core.calibrated``): the spec ``psd-f:budget=B``, the record store,
resolving a recorded choice in ``PipelineSpec`` without loading anything, the errors that say how
to calibrate, and the planner's candidates for a preset (``lab.budget.preset_candidates``,
``choose`` within a family). The calibration end to end on tiny models: tests/test_budget.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyramid_core.build import PipelineSpec, resolve_preset
from pyramid_core.calibrated import (
    STORE_ENV,
    BudgetKey,
    BudgetRecord,
    calibrate_command,
    lookup,
    parse_budgeted,
    save,
    store_path,
)
from pyramid_core.errors import ConfigError
from pyramid_core.lab.budget import BudgetGrid, Candidate, Measured, choose, preset_candidates
from pyramid_core.lab.quality import Price
from pyramid_core.types import SamplingConfig

SPECS = ("smollm2:stage=draft", "smollm2:stage=qualifier", "smollm2")
T1 = SamplingConfig(temperature=1.0)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "budgets.json"
    monkeypatch.setenv(STORE_ENV, str(path))
    return path


def record(budget: float = 0.1, sampling: SamplingConfig = T1, stages: tuple[str, ...] = SPECS) -> BudgetRecord:
    return BudgetRecord(BudgetKey("psd-f", stages, budget, sampling),
                        ("fuzzy:div=js,tau=0.1", "fuzzy:div=js,tau=0.3"), (4, 8), (0.1, 0.3), 41.5,
                        (0.04, 0.05), (0.06, 0.07), "2026-12-05T00:00:00+00:00", "pyramid plan ...")


def test_parse_budgeted() -> None:
    assert parse_budgeted("psd-f") == ("psd-f", None)
    assert parse_budgeted("psd-f:budget=0.05") == ("psd-f", 0.05)
    with pytest.raises(ConfigError, match="unknown parameter 'tau'.*only budget=NATS"):
        parse_budgeted("psd-f:tau=0.3")
    with pytest.raises(ConfigError, match="budget='cheap' is not a number"):
        parse_budgeted("psd-f:budget=cheap")
    for bad in ("-0.1", "nan", "inf"):
        with pytest.raises(ConfigError, match="finite and >= 0"):
            parse_budgeted(f"psd-f:budget={bad}")


def test_store_round_trip_and_keys(store: Path) -> None:
    assert store_path() == store and lookup(record().key) is None
    save(record())
    save(record(0.5))
    save(record(0.1, SamplingConfig(temperature=0.7)))
    assert lookup(record().key) == record()
    assert lookup(record(0.5).key) == record(0.5)
    # another budget, sampler or chain is another record
    assert lookup(BudgetKey("psd-f", SPECS, 0.2, T1)) is None
    assert lookup(BudgetKey("psd-f", SPECS[1:], 0.1, T1)) is None
    assert lookup(BudgetKey("psd-a", SPECS, 0.1, T1)) is None
    assert lookup(BudgetKey("psd-f", SPECS, 0.1, SamplingConfig(temperature=1.0, top_k=50))) is None
    # replaced, not duplicated
    save(attrs_evolve_rate(record(), 50.0))
    assert lookup(record().key).tokens_per_s == 50.0  # type: ignore[union-attr]
    assert len(json.loads(store.read_text())["records"]) == 3


def attrs_evolve_rate(rec: BudgetRecord, rate: float) -> BudgetRecord:
    import attrs

    return attrs.evolve(rec, tokens_per_s=rate)


def test_store_refuses_a_foreign_file(store: Path) -> None:
    store.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read.*PYRAMID_BUDGETS"):
        lookup(record().key)
    store.write_text(json.dumps({"records": []}))
    with pytest.raises(ConfigError, match="not a budgeted-preset record file"):
        save(record())


def test_spec_resolves_to_the_record_without_loading(store: Path) -> None:
    save(record())
    stages, policies, lengths = PipelineSpec(SPECS, preset="psd-f:budget=0.1", sampling=T1).parts()
    assert stages == SPECS and policies == ["fuzzy:div=js,tau=0.1", "fuzzy:div=js,tau=0.3"] and lengths == [4, 8]
    # the plain preset is untouched: the paper's thresholds and lengths
    _, policies, lengths = PipelineSpec(SPECS, preset="psd-f", sampling=T1).parts()
    assert policies == list(resolve_preset("psd-f", 3).policies) and lengths == [15, 25]


def test_spec_errors_say_how_to_calibrate(store: Path) -> None:
    save(record())
    with pytest.raises(ConfigError) as err:
        PipelineSpec(SPECS, preset="psd-f:budget=0.02", sampling=T1).parts()
    text = str(err.value)
    assert "has not been calibrated for smollm2:stage=draft -> smollm2:stage=qualifier -> smollm2" in text
    assert calibrate_command(BudgetKey("psd-f", SPECS, 0.02, T1)) in text and str(store) in text
    assert "pyramid plan --quality-budget 0.02 --preset psd-f --stage smollm2:stage=draft" in text
    with pytest.raises(ConfigError, match="has not been calibrated.*--temperature 0.5"):
        PipelineSpec(SPECS, preset="psd-f:budget=0.1", sampling=SamplingConfig(temperature=0.5)).parts()
    with pytest.raises(ConfigError, match="block lengths are part of what was calibrated"):
        PipelineSpec(SPECS, preset="psd-f:budget=0.1", block_lengths=(4, 8), sampling=T1).parts()
    with pytest.raises(ConfigError, match="preset 'psd-f' is for 3 stages, got 2"):
        PipelineSpec(SPECS[1:], preset="psd-f:budget=0.1", sampling=T1).parts()
    with pytest.raises(ConfigError, match="unknown parameter 'tau'"):
        PipelineSpec(SPECS, preset="psd-f:tau=0.1", sampling=T1).parts()


def test_spec_with_loaded_stages_is_refused(store: Path, tiny_models: dict[str, object]) -> None:
    from pyramid_core.backends.hf import HFStage
    from pyramid_core.backends.hf.tiny import word_tokenizer

    tok = word_tokenizer([f"w{i}" for i in range(64)])
    loaded = tuple(HFStage(tiny_models[k], tok, name=k) for k in ("far", "near", "target"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="looked up by the stages' specs.*'far' is a loaded stage"):
        PipelineSpec(loaded, preset="psd-f:budget=0.1", sampling=T1).parts()


def test_preset_candidates() -> None:
    grid = BudgetGrid((0.1, 0.3), ((4, 8), (2,)))
    cands = preset_candidates(resolve_preset("psd-f", 3), 3, grid)
    refs = [c for c in cands if c.rule != "psd-f"]
    assert [c.rule for c in refs] == ["target alone", "exact", "exact"]
    assert {c.block_lengths for c in refs if c.rule == "exact"} == {(4, 8), (15, 25)}  # the preset's own too
    mine = [c for c in cands if c.rule == "psd-f"]
    assert len(mine) == 2 * 4 and {c.thresholds for c in mine} == {(0.1, 0.1), (0.1, 0.3), (0.3, 0.1), (0.3, 0.3)}
    one = next(c for c in mine if c.thresholds == (0.3, 0.1) and c.block_lengths == (4, 8))
    assert one.policies == ("fuzzy:div=js,tau=0.3", "fuzzy:div=js,tau=0.1") and not one.lossless
    # psd-a: only its fuzzy boundary is set; the assisted one is kept
    assisted = [c for c in preset_candidates(resolve_preset("psd-a", 3), 3, grid) if c.rule == "psd-a"]
    assert {c.policies[0] for c in assisted} == {"assisted"} and {c.thresholds for c in assisted} == {(0.1,), (0.3,)}
    fsd = [c for c in preset_candidates(resolve_preset("fsd", 2), 2, grid) if c.rule == "fsd"]
    assert {c.block_lengths for c in fsd} == {(2,), (8,)} and len(fsd) == 4
    with pytest.raises(ConfigError, match="preset 'sd' has no fuzzy boundary"):
        preset_candidates(resolve_preset("sd", 3), 3, grid)


def measured(c: Candidate, rate: float, mean: float, ci: float) -> Measured:
    return Measured(c, 100, 1.0, rate, 2.0, Price(mean, ci, 10))


def test_choose_within_a_family() -> None:
    alone = Candidate("target alone", (2,))
    exact = Candidate("exact", (0, 1, 2), ("exact", "exact"), (4, 8))
    loose = Candidate("psd-f", (0, 1, 2), ("fuzzy:div=js,tau=0.5",) * 2, (4, 8), (0.5, 0.5))
    tight = Candidate("psd-f", (0, 1, 2), ("fuzzy:div=js,tau=0.1",) * 2, (4, 8), (0.1, 0.1))
    ms = [measured(alone, 20, 0, 0.1), measured(exact, 60, 0.01, 0.1), measured(loose, 50, 1.0, 0.2),
          measured(tight, 30, 0.05, 0.04)]
    # the whole search: a faster lossless chain wins; within the family: the fastest within the budget
    assert choose(ms, 0.1).candidate == exact
    assert choose(ms, 0.1, "psd-f").candidate == tight
    assert choose(ms, 2.0, "psd-f").candidate == loose
    with pytest.raises(ConfigError, match=r"no threshold of 'psd-f' .* budget 0.05 .*cheapest measured, psd-f "
                                          r"tau=0.1,0.1 .* costs \+0.050 ± 0.040"):
        choose(ms, 0.05, "psd-f")
