"""Planning within a quality budget (docs/algorithms.md, "Planning within a quality budget"): the
candidates per stage count, the choice and the pruning on injected figures (no model), the held-out
validation and the generate line on tiny random models, ``pyramid plan --quality-budget`` and
``pyramid sweep --quality-budget`` end to end on tiny saved models."""

from __future__ import annotations

import json
import math
import random
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pyramid_core.backends.hf import HFStage
from pyramid_core.backends.hf.tiny import save_with_words, word_tokenizer
from pyramid_core.cli import main, parse_args
from pyramid_core.errors import ConfigError
from pyramid_core.lab import budget as budget_mod
from pyramid_core.lab.budget import (
    BudgetGrid,
    Candidate,
    Measured,
    candidates,
    choose,
    plan_within_budget,
    search,
    split_prompts,
)
from pyramid_core.lab.prompts import Prompt
from pyramid_core.lab.quality import Price
from pyramid_core.types import SamplingConfig

# --- the candidates ------------------------------------------------------------------------------


def test_candidates_two_stages() -> None:
    cands = candidates(2, BudgetGrid((0.3, 0.1), [(4,), (8,), (4, 8)]))
    rules = [(c.rule, c.stages, c.block_lengths, c.thresholds) for c in cands]
    assert rules[0] == ("target alone", (1,), (), ())
    assert ("exact", (0, 1), (4,), ()) in rules and ("exact", (0, 1), (8,), ()) in rules
    fuzzy = [c for c in cands if c.rule == "fuzzy"]
    assert sorted((c.block_lengths, c.thresholds) for c in fuzzy) == [((4,), (0.1,)), ((4,), (0.3,)),
                                                                      ((8,), (0.1,)), ((8,), (0.3,))]
    assert fuzzy[0].policies == ("fuzzy:div=js,tau=0.1",)
    assert {c.rule for c in cands} == {"target alone", "exact", "fuzzy"}  # the 3-stage point is not used
    assert [c.lossless for c in cands[:3]] == [True, True, True] and not any(c.lossless for c in fuzzy)


def test_candidates_three_stages() -> None:
    cands = candidates(3, BudgetGrid((0.1, 0.4), [(4,), (4, 8)]))
    by = {c.rule: [x for x in cands if x.rule == c.rule] for c in cands}
    assert {c.stages for c in by["exact"]} == {(0, 2), (1, 2), (0, 1, 2)}
    assert {c.stages for c in by["fuzzy"]} == {(0, 2), (1, 2)}  # FSD on the top pair, and draft -> target
    assert [c.policies for c in by["psd-a"]] == [("assisted", "fuzzy:div=js,tau=0.1"), ("assisted", "fuzzy:div=js,tau=0.4")]
    assert {c.thresholds for c in by["psd-f"]} == {(0.1, 0.1), (0.1, 0.4), (0.4, 0.1), (0.4, 0.4)}
    assert all(c.block_lengths == (4, 8) for c in by["psd-a"] + by["psd-f"])


def test_candidates_refuse_bad_grids() -> None:
    with pytest.raises(ConfigError, match="2 or 3 stages"):
        candidates(4)
    with pytest.raises(ConfigError, match="no point for 2 stages"):
        candidates(2, BudgetGrid((0.1,), [(4, 8)]))
    with pytest.raises(ConfigError):  # decreasing upwards
        BudgetGrid((0.1,), [(8, 4)])
    with pytest.raises(ConfigError, match="finite numbers >= 0"):
        BudgetGrid((-0.1,))


# --- the choice and the pruning, on injected figures ---------------------------------------------


def fake(c: Candidate, tokens_per_s: float, mean: float, ci: float = 0.02) -> Measured:
    return Measured(c, 100, 100 / tokens_per_s, tokens_per_s, 2.0, Price(mean, ci, 8))


def test_choice_is_the_fastest_within_the_budget() -> None:
    alone = fake(Candidate("target alone", (1,)), 10.0, 0.01)
    exact = fake(Candidate("exact", (0, 1), ("exact",), (4,)), 15.0, -0.02)
    loose = fake(Candidate("fuzzy", (0, 1), ("fuzzy:div=js,tau=0.5",), (4,), (0.5,)), 30.0, 0.25)
    mid = fake(Candidate("fuzzy", (0, 1), ("fuzzy:div=js,tau=0.3",), (4,), (0.3,)), 22.0, 0.08)
    tight = fake(Candidate("fuzzy", (0, 1), ("fuzzy:div=js,tau=0.1",), (4,), (0.1,)), 17.0, 0.01)
    edge = fake(Candidate("fuzzy", (0, 1), ("fuzzy:div=js,tau=0.2",), (8,), (0.2,)), 25.0, 0.09, ci=0.02)
    unsure = Measured(Candidate("fuzzy", (0, 1), ("fuzzy:div=js,tau=0.1",), (8,), (0.1,)), 5, 0.01, 500.0, 2.0,
                      Price(0.0, math.nan, 1))
    everything = [alone, exact, loose, mid, tight, edge, unsure]
    assert choose(everything, 0.1) is mid  # edge: 0.09 + 0.02 = 0.11 > 0.1 (its upper bound decides)
    assert choose(everything, 0.11) is edge
    assert choose(everything, 0.3) is loose
    assert choose(everything, 0.05) is tight
    # a budget of 0: no lossy price is surely <= 0, the fastest lossless one
    assert choose(everything, 0.0) is exact
    assert choose([alone, loose], 0.0) is alone
    assert not unsure.within(1.0)  # one text: no interval, never within
    with pytest.raises(ConfigError):
        choose([loose], 0.0)


def monotone_case(seed: int) -> tuple[list[Candidate], dict[Candidate, Measured]]:
    """Candidates of a 3-stage grid whose prices rise with every threshold (lower bounds too),
    speeds rising with the thresholds, random per ladder."""
    rng = random.Random(seed)
    taus = sorted(rng.sample([0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 4))
    cands = candidates(3, BudgetGrid(taus, [(4,), (4, 8), (8, 16)]))
    figures: dict[Candidate, Measured] = {}
    slope = {c.ladder: [rng.uniform(0.05, 0.6) for _ in range(2)] for c in cands}
    for c in cands:
        w = slope[c.ladder]
        price = sum(a * t for a, t in zip(w, c.thresholds)) + rng.uniform(-0.01, 0.01) * (not c.thresholds)
        speed = 10 + 40 * sum(c.thresholds) + rng.uniform(0, 5)
        figures[c] = fake(c, speed, price, ci=0.03)
    return cands, figures


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [0.0, 0.05, 0.1, 0.2, 0.4])
def test_pruning_never_skips_a_candidate_that_could_qualify(seed: int, budget: float) -> None:
    cands, figures = monotone_case(seed)
    calls: list[Candidate] = []

    def measure(c: Candidate) -> Measured:
        calls.append(c)
        return figures[c]

    measured, skipped = search(cands, measure, budget)
    assert len(calls) == len(measured) and len(measured) + len(skipped) == len(cands)
    assert {m.candidate for m in measured} | set(skipped) == set(cands)
    # every skipped candidate: a measured one on its ladder with thresholds at most its own is
    # already surely over the budget, and (prices rising with thresholds) it is itself not within
    for c in skipped:
        assert not c.lossless
        assert any(c.presumed_costlier(m.candidate) and m.price.low > budget for m in measured)
        assert not figures[c].within(budget)
    # each ladder in increasing thresholds; the ladders interleaved (every first rung before any second)
    for ladder in {c.ladder for c in calls}:
        rungs = [c.thresholds for c in calls if c.ladder == ladder]
        assert rungs == sorted(rungs)
    firsts = {c.ladder: k for k, c in reversed(list(enumerate(calls)))}
    assert sorted(firsts.values()) == list(range(len(firsts)))
    # the pruned search chooses what the exhaustive one does
    assert choose(measured, budget) == choose(list(figures.values()), budget)
    if budget == 0.0:
        assert skipped  # the pruning saves measurements


# --- prompts ---------------------------------------------------------------------------------------


def test_split_prompts_is_disjoint_per_kind() -> None:
    prompts = [Prompt(f"{k}{i}", k, f"{k} {i}") for k in "ab" for i in range(4)]
    tune, held = split_prompts(prompts, 2, 1)
    assert [p.id for p in tune] == ["a0", "a1", "b0", "b1"] and [p.id for p in held] == ["a2", "b2"]
    with pytest.raises(ConfigError, match="held-out"):
        split_prompts(prompts, 4, 1)


# --- on tiny random models ------------------------------------------------------------------------

WORDS = [f"w{i}" for i in range(64)]


@pytest.fixture(scope="module")
def tiny_chain(tiny_models: dict[str, Any]) -> list[HFStage]:
    tok = word_tokenizer(WORDS)
    return [HFStage(tiny_models["far"], tok, name="far"), HFStage(tiny_models["near"], tok, name="near"),
            HFStage(tiny_models["target"], tok, name="target")]


TUNE = [Prompt("t1", "any", "w1 w2 w3 w4 w5"), Prompt("t2", "any", "w10 w11 w12 w13")]
HELD = [Prompt("h1", "any", "w20 w21 w22 w23 w24"), Prompt("h2", "any", "w30 w31 w32")]


def test_plan_within_budget_on_tiny_models(tiny_chain: list[HFStage], monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[tuple[Candidate, list[tuple[int, ...]]]] = []
    real = budget_mod.measure_candidate

    def spy(c: Candidate, stages: Sequence[Any], encoded: Sequence[Sequence[int]], *args: Any, **kw: Any) -> Measured:
        runs.append((c, [tuple(e) for e in encoded]))
        return real(c, stages, encoded, *args, **kw)

    monkeypatch.setattr(budget_mod, "measure_candidate", spy)
    names = ["far", "near", "target"]
    plan = plan_within_budget(tiny_chain, 0.3, TUNE, HELD, sampling=SamplingConfig(temperature=1.0), seeds=[0, 1],
                              max_new_tokens=6, grid=BudgetGrid((0.1, 0.6), [(2,), (2, 4)]), names=names, chat=False)
    tok = tiny_chain[-1].tokenizer
    tune_ids = {tuple(tok.encode(p.text)) for p in TUNE}
    held_ids = {tuple(tok.encode(p.text)) for p in HELD}
    assert not tune_ids & held_ids
    measured = {m.candidate for m in plan.measured}
    assert len(measured) + len(plan.skipped) == len(candidates(3, BudgetGrid((0.1, 0.6), [(2,), (2, 4)])))
    for m in plan.measured:  # every text: 2 prompts x 2 seeds
        assert m.price.n == 4 and m.tokens > 0 and m.tokens_per_s > 0
    # the search ran on the tuning prompts only; the validation on the held-out ones only
    tuned = [c for c, e in runs if set(e) == tune_ids]
    validated = [c for c, e in runs if set(e) == held_ids]
    warm = [c for c, e in runs if len(e) == 1]  # one tuning prompt per chain and lengths, untimed
    assert {(c.stages, c.block_lengths) for c in warm} == {(c.stages, c.block_lengths) for c in measured}
    assert len(tuned) == len(plan.measured) and len(tuned) + len(validated) + len(warm) == len(runs)
    assert set(validated) == {plan.chosen.candidate, plan.best_lossless.candidate,
                              next(c for c in measured if c.rule == "target alone")}
    assert plan.chosen is choose(plan.measured, 0.3)
    v = plan.validation
    assert v is not None and v.prompts == 2 and v.chosen.candidate == plan.chosen.candidate
    assert v.speedup_over_alone == pytest.approx(v.chosen.tokens_per_s / v.alone.tokens_per_s)
    text = plan.to_markdown()
    assert "| rule | stages | thresholds | lengths | tok/s | tokens/target fwd | price (95% CI) | within |" in text
    assert "Held-out validation (2 prompt(s) x 2 seed(s)" in text and plan.verdict in text
    json.dumps(plan.as_dict())  # JSON-ready

    # a budget of 0 chooses a lossless configuration
    zero = plan_within_budget(tiny_chain[1:], 0.0, TUNE, HELD, sampling=SamplingConfig(temperature=1.0), seeds=[0, 1],
                              max_new_tokens=6, grid=BudgetGrid((0.1, 0.6), [(2,)]), names=names[1:], chat=False)
    assert zero.chosen.candidate.lossless

    with pytest.raises(ConfigError, match="also tuning prompts"):
        plan_within_budget(tiny_chain[1:], 0.1, TUNE, [TUNE[0]], sampling=SamplingConfig(temperature=1.0),
                           seeds=[0], max_new_tokens=4, chat=False)


def test_generate_command_parses_back(tiny_chain: list[HFStage]) -> None:
    names = ["hf:path=/d,num_layers=1", "hf:path=/q", "hf:path=/t"]
    sampling = SamplingConfig(temperature=0.7, top_k=20, top_p=0.9)
    for c in candidates(3, BudgetGrid((0.25,), [(3,), (3, 6)])):
        m = fake(c, 10.0, 0.0)
        plan = budget_mod.BudgetPlan(tuple(names), 0.1, sampling, 24, (0,), 1, (m,), (), m, m)
        ns = parse_args(shlex.split(plan.generate_command(device="cpu", chat=False))[1:])
        assert ns.stage == [names[i] for i in c.stages]
        assert (ns.policy or []) == list(c.policies)
        assert (ns.length or []) == list(c.block_lengths)
        assert (ns.temperature, ns.top_k, ns.top_p) == (0.7, 20, 0.9)
        assert ns.max_new_tokens == 24 and ns.device == "cpu" and ns.chat is False and ns.prompt == "YOUR PROMPT"


# --- the command lines, end to end -----------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tiny_models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("budget")
    return {k: save_with_words(tiny_models[k], root / k) for k in ("target", "near")}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("budget") / "prompts.jsonl"
    rows = [{"id": f"{k}{i}", "kind": k, "prompt": f"w{3 + i} w{5 + i} w{7 + i} w{9 + i}"} for k in ("a", "b")
            for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_plan_quality_budget(saved: dict[str, Path], prompt_file: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    stages = [f"hf:path={saved['near']},num_layers=1", f"hf:path={saved['near']}", f"hf:path={saved['target']}"]
    common = [a for s in stages for a in ("--stage", s)] + [
        "--quality-budget", "0.2", "--prompts", str(prompt_file), "--per-kind", "1", "--heldout-per-kind", "1",
        "--seeds", "2", "--max-new-tokens", "6", "--taus", "0.1,0.6", "--length-grid", "2", "--length-grid", "2,4",
        "--no-chat", "--no-compile", "-q"]
    assert main(["plan", *common]) == 0
    out = capsys.readouterr().out
    assert "| rule | stages | thresholds | lengths |" in out and "Held-out validation (2 prompt(s) x 2 seed(s)" in out
    assert "the first 1 tune, the next 1 are held out" in out
    command = next(line for line in out.splitlines() if line.startswith("pyramid generate"))
    argv = shlex.split(command)[1:]
    argv[argv.index("YOUR PROMPT")] = "w3 w5 w7"
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    capsys.readouterr()

    # --json, and the same run from a TOML config
    config = tmp_path / "budget.toml"
    config.write_text(f"stage = {json.dumps(stages)}\nquality_budget = 0.2\nprompts = {json.dumps(str(prompt_file))}\n"
                      "per_kind = 1\nheldout_per_kind = 1\nseeds = 2\nmax_new_tokens = 6\ntaus = \"0.1,0.6\"\n"
                      "length_grid = [\"2\", \"2,4\"]\nchat = false\ncompile = \"eager\"\ntemperature = 0.8\n")
    assert main(["plan", "--config", str(config), "--json", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stages"] == stages and data["budget"] == 0.2 and data["sampling"]["temperature"] == 0.8
    assert data["tuning"] == ["a0", "b0"] and data["heldout"] == ["a1", "b1"]
    assert data["run"]["command"] == "pyramid plan" and data["run"]["arguments"]["quality_budget"] == [0.2]
    assert data["validation"]["prompts"] == 2 and data["command"].startswith("pyramid generate")
    assert data["chosen"]["lossless"] or data["chosen"]["price"]["mean"] + data["chosen"]["price"]["ci95"] <= 0.2
    rules = {c["rule"] for c in data["candidates"]}
    assert rules == {"target alone", "exact", "fuzzy", "psd-a", "psd-f"}


def test_cli_plan_budgeted_preset(saved: dict[str, Path], prompt_file: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``plan --quality-budget A,B --preset psd-f`` calibrates and records the preset's budgeted form
    at both budgets over one search; the printed ``generate --preset psd-f:budget=B`` line runs it."""
    store = tmp_path / "budgets.json"
    monkeypatch.setenv("PYRAMID_BUDGETS", str(store))
    stages = [f"hf:path={saved['near']},num_layers=1", f"hf:path={saved['near']}", f"hf:path={saved['target']}"]
    argv = ["plan", *[a for s in stages for a in ("--stage", s)], "--quality-budget", "50,100", "--preset", "psd-f",
            "--prompts", str(prompt_file), "--per-kind", "1", "--heldout-per-kind", "1", "--seeds", "2",
            "--max-new-tokens", "6", "--taus", "0.1,0.6", "--length-grid", "2,4", "--no-chat", "--no-compile", "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "## Budget 100 nats/token" in out and f"Recorded in {store}: psd-f:budget=50 -> " in out
    records = json.loads(store.read_text())["records"]
    assert sorted(r["budget"] for r in records.values()) == [50.0, 100.0]
    for r in records.values():
        assert r["preset"] == "psd-f" and r["stages"] == stages and r["command"].startswith("pyramid plan ")
        assert len(r["thresholds"]) == 2 and r["price"][0] + r["price"][1] <= r["budget"]
    lines = [line for line in out.splitlines() if line.startswith("pyramid generate")]
    assert len(lines) == 2 and all("--preset psd-f:budget=" in line and "--policy" not in line for line in lines)
    gen = shlex.split(lines[1])[1:]
    gen[gen.index("YOUR PROMPT")] = "w3 w5 w7"
    assert main([*gen, "--max-new-tokens", "4", "--no-compile", "-q"]) == 0
    capsys.readouterr()
    # another sampler was not calibrated: the error names the command that would be
    gen[gen.index("--temperature") + 1] = "0.5"
    assert main([*gen, "--max-new-tokens", "4", "-q"]) == 2
    assert "pyramid plan --quality-budget 100 --preset psd-f" in capsys.readouterr().err
    # --preset plans nothing without a budget; an unknown preset is refused before loading
    assert main(["plan", "--preset", "psd-f", "--stage", stages[-1]]) == 2
    assert "add --quality-budget" in capsys.readouterr().err
    assert main(["plan", "--quality-budget", "0.1", "--preset", "nope", *[a for s in stages for a in ("--stage", s)]]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_plan_quality_budget_errors(saved: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):  # refused by argparse, by name
        main(["plan", "--quality-budget", "-1"])
    assert "--quality-budget: a price budget is finite and >= 0" in capsys.readouterr().err
    assert main(["plan", "--quality-budget", "0.1", "--stage", f"hf:path={saved['target']}"]) == 2
    assert "2 or 3 stages" in capsys.readouterr().err
    assert main(["plan", "--quality-budget", "0.1", "--stage", f"hf:path={saved['near']}", "--stage",
                 f"hf:path={saved['target']}", "--length-grid", "8,4"]) == 2
    assert "--length-grid" in capsys.readouterr().err


def test_cli_sweep_quality_budget(saved: dict[str, Path], prompt_file: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["sweep", "--preset", "fsd", "--stage", f"hf:path={saved['near']}", "--stage", f"hf:path={saved['target']}",
            "--taus", "0.05,0.6", "--prompts", str(prompt_file), "--per-kind", "1", "--max-new-tokens", "6",
            "--no-chat", "--no-compile", "--out", str(out), "-q"]
    assert main(args) == 0
    before = json.loads((out / "sweep.json").read_text())
    assert "quality_budget" not in before and "quality budget" not in capsys.readouterr().out
    # the budget added afterwards: the points come from the finished run's log, drawn with the budget
    assert main([*args, "--quality-budget", "0.1"]) == 0
    text = capsys.readouterr().out
    assert "fastest within the quality budget 0.1 nats/token" in text
    data = json.loads((out / "sweep.json").read_text())
    assert data["points"] == before["points"]
    assert data["quality_budget"] == 0.1 and (out / "sweep.png").stat().st_size > 0


@pytest.mark.slow
def test_plan_within_budget_smollm2() -> None:
    """The distilled draft into SmolLM2-135M, 2 tuning and 2 held-out prompts x 2 seeds, 16
    tokens: the figures are finite, the choice follows the rule and its generate line parses."""
    from pyramid_core.backends.hf.smollm2 import ensure_smollm2
    from pyramid_core.lab.prompts import load_prompts

    ensure_smollm2(progress=False)  # a no-op once `pyramid setup` has run
    tune, held = split_prompts(load_prompts(kinds=["chat", "qa"], per_kind=2), 1, 1)
    stages = ["smollm2:stage=draft", "smollm2"]
    plan = plan_within_budget(stages, 0.1, tune, held, sampling=SamplingConfig(temperature=1.0), seeds=[0, 1],
                              max_new_tokens=16, grid=BudgetGrid((0.2, 0.5), [(4,)]))
    assert plan.stages == tuple(stages) and plan.tuning_prompts == 2
    for m in plan.measured:
        assert m.price.n == 4 and math.isfinite(m.price.mean) and m.tokens_per_s > 0
    assert plan.chosen is choose(plan.measured, 0.1)
    assert plan.validation is not None and plan.validation.prompts == 2
    ns = parse_args(shlex.split(plan.generate_command())[1:])
    assert ns.stage == [stages[i] for i in plan.chosen.candidate.stages]
