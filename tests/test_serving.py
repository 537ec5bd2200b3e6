"""The lower chain as vLLM's proposer (pyramid_core.serving.proposer), driven here the way vLLM's
model runner drives a ``custom_class`` proposer -- rows of a batch, a token table, contexts that
grow by what was accepted -- with a greedy verifier standing in for vLLM's rejection sampler.
vLLM itself runs these in ``nox -s vllm`` (tests/in_vllm/)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pyramid_core import ConfigError
from pyramid_core.backends.hf.tiny import save_with_words
from pyramid_core.build import PipelineSpec
from pyramid_core.lab.latency import expected_tokens
from pyramid_core.pipeline import LookupFirst
from pyramid_core.rng import Rng
from pyramid_core.serving.planner import SUPPORT_EDGES, Offer, StepPlanner, support, support_bucket
from pyramid_core.serving.proposer import CHAIN_ENV, LowerChain, PyramidProposer, build_lower

VOCAB = 64
K = 4


@pytest.fixture(scope="module")
def dirs(tiny_models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving")
    return {name: save_with_words(tiny_models[name], root / name) for name in ("target", "near", "far")}


def chain_of(dirs: dict[str, Path], *, three: bool = True, adaptive: bool = False) -> LowerChain:
    stages = ([f"hf:path={dirs['near']},num_layers=1", f"hf:path={dirs['near']}"] if three
              else [f"hf:path={dirs['near']}"])
    spec = PipelineSpec(stages=[*stages, f"hf:path={dirs['target']}"], policies=["exact"] * len(stages),
                        block_lengths=[2, K] if three else [K])
    return LowerChain.of(spec, adaptive=adaptive)[0]


def test_the_lower_chain_of_a_spec(dirs: dict[str, Path]) -> None:
    spec = PipelineSpec(stages=["ngram", f"hf:path={dirs['near']}", f"hf:path={dirs['target']}"],
                        policies=["fuzzy:tau=0.3", "exact"], block_lengths=[3, 6], dtype="float32")
    chain, target, k, method = LowerChain.of(spec, max_lanes=8)
    assert chain.stages == ("ngram", f"hf:path={dirs['near']}") and chain.policies == ("fuzzy:tau=0.3",)
    assert chain.block_lengths == (3,) and chain.dtype == "float32" and chain.max_lanes == 8
    assert (target, k, method) == (f"hf:path={dirs['target']}", 6, "standard")
    block = PipelineSpec(stages=["ngram", f"hf:path={dirs['target']}"], policies=["block"])
    assert LowerChain.of(block)[3] == "block"  # vLLM's block verification
    assert LowerChain.from_json(chain.to_json()) == chain


@pytest.mark.parametrize(("spec", "message"), [
    (PipelineSpec(stages=["ngram", "hf:path=/t"], policies=["fuzzy:tau=0.3"]), "vLLM's own rejection sampler"),
    (PipelineSpec(stages=["ngram", "hf:path=/t"], policies=["exact:tol=1"]), "use exact or block at the top"),
    (PipelineSpec(stages=["hf:path=/t"]), "needs a stage below the target"),
    (PipelineSpec(stages=["hf:path=/d", "hf:path=/t"], tree="tree:branching=2"), "not a token tree"),
    (PipelineSpec(stages=["hf:path=/d", "hf:path=/t"], lookup="ngram", lookup_graft=True),
     "lookup_graft grafts the lookup's block into a token tree"),
    # what the workers would build is checked before vLLM starts: a preset's name is not a rule
    (PipelineSpec(stages=["ngram", "hf:path=/d", "hf:path=/t"], policies=["fsd:threshold=0.3", "exact"]),
     r"policy 'fsd:threshold=0.3' at boundary 1 -> 2 of the lower chain: unknown policy 'fsd'"),
    (PipelineSpec(stages=["ngram", "hf:path=/d", "hf:path=/t"], policies=["fuzzy:tau=-1", "exact"]),
     "tau must be a number >= 0"),
    (PipelineSpec(stages=["ngrm", "hf:path=/t"]), r"unknown stage 'ngrm'; did you mean 'ngram'"),
])
def test_what_cannot_run_inside_vllm_is_refused_before_loading(spec: PipelineSpec, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LowerChain.of(spec)


def test_the_chain_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CHAIN_ENV, raising=False)
    with pytest.raises(ConfigError, match=CHAIN_ENV):
        LowerChain.from_env()
    monkeypatch.setenv(CHAIN_ENV, "{not json")
    with pytest.raises(ConfigError, match="does not hold a lower chain"):
        LowerChain.from_env()
    monkeypatch.setenv(CHAIN_ENV, LowerChain(("ngram",)).to_json())
    assert LowerChain.from_env().stages == ("ngram",)
    with pytest.raises(ConfigError, match="2 stages need 1 policies"):
        LowerChain(("ngram", "hf:path=/d"))


def test_a_stage_with_another_vocabulary_is_named(dirs: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"stage 'hf:path=.*near' has a vocabulary of 64 tokens; vLLM's target has 65"):
        build_lower(chain_of(dirs, three=False), VOCAB + 1)


class FakeRunner:
    """vLLM's side of a ``custom_class`` proposer: a token table with one row per running request,
    ``num_tokens_no_spec`` per row, rows that sampled nothing while their prompt is prefilled,
    and rows that move when a request finishes; verification keeps the target's argmax."""

    def __init__(self, target: Any, prompts: list[list[int]], new_tokens: int, max_len: int = 96,
                 step_cost: tuple[float, float] = (0.0, 0.0)) -> None:
        self.target = target
        self.step_cost = step_cost  # the engine's step takes a + b * query tokens on the simulated clock
        self.time = 0.0
        self.verdicts: list[tuple[int, int]] = []  # (offered, accepted) of blocks whose request goes on
        self.requests = [list(p) for p in prompts]
        self.left = [new_tokens] * len(prompts)
        self.prompt_len = [len(p) for p in prompts]
        self.max_len = max_len
        self.forwards = 0

    @torch.inference_mode()
    def argmax_after(self, tokens: list[int]) -> list[int]:
        self.forwards += 1
        return self.target(torch.tensor([tokens])).logits[0, :, :VOCAB].argmax(-1).tolist()

    def run(self, proposer: PyramidProposer, *, reverse_rows: bool = False) -> list[list[int]]:
        live = list(range(len(self.requests)))
        fresh = set(live)  # requests whose prompt was just prefilled: they sampled nothing yet
        ending: list[int] = []  # requests that finished in the last step: in the batch once more, as in vLLM
        while live or ending:
            rows = ending + live
            order = rows[::-1] if reverse_rows and len(rows) % 2 else rows  # rows move between steps
            table = np.zeros((len(order), self.max_len), dtype=np.int32)
            counts = np.zeros(len(order), dtype=np.int32)
            for row, r in enumerate(order):
                table[row, : len(self.requests[r])] = self.requests[r]
                counts[row] = len(self.requests[r])
            sampled = [[] if r in fresh else [self.requests[r][-1]] for r in order]
            drafts = proposer.propose(sampled, counts, table)
            assert len(drafts) == len(order)
            self.time += self.step_cost[0] + self.step_cost[1] * sum(1 + len(d) for r, d in zip(order, drafts)
                                                                     if r in live)
            for row, r in enumerate(order):
                seq = self.requests[r]
                if r not in live:
                    continue
                if r in fresh:
                    assert drafts[row] == []
                    seq.append(self.argmax_after(seq)[-1])
                    self.left[r] -= 1
                    continue
                block = drafts[row][: self.left[r] - 1]
                best = self.argmax_after(seq + block)[len(seq) - 1:]
                accepted = next((j for j, t in enumerate(block) if t != best[j]), len(block))
                emitted = [*block[:accepted], best[accepted]][: self.left[r]]
                seq += emitted
                self.left[r] -= len(emitted)
                if drafts[row]:
                    self.verdicts.append((len(drafts[row]), min(accepted, len(emitted) - 1)))
            fresh = set()
            ending = [r for r in live if self.left[r] <= 0]
            live = [r for r in live if self.left[r] > 0]
        return [seq[n:] for seq, n in zip(self.requests, self.prompt_len, strict=True)]


@torch.inference_mode()
def plain_greedy(target: Any, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(target(torch.tensor([seq])).logits[0, -1, :VOCAB].argmax()))
    return seq[len(prompt):]


PROMPTS = [[3, 5, 7, 9], [3, 5, 7, 11, 2], [40, 41, 3, 5, 7, 9, 12], [1, 2, 1, 2, 1, 2], [63, 0, 17]]


@pytest.mark.parametrize("three", [True, False], ids=["draft-qualifier", "draft"])
def test_served_greedy_output_is_the_targets(tiny_models: dict[str, Any], dirs: dict[str, Path], three: bool) -> None:
    proposer = PyramidProposer.for_chain(chain_of(dirs, three=three), num_speculative_tokens=K, vocab_size=VOCAB,
                                         max_model_len=96)
    runner = FakeRunner(tiny_models["target"], PROMPTS, new_tokens=20)
    out = runner.run(proposer, reverse_rows=True)
    for prompt, got in zip(PROMPTS, out, strict=True):
        assert got == plain_greedy(tiny_models["target"], prompt, 20)
    # the near draft is often right: fewer target forwards than tokens
    assert runner.forwards < 20 * len(PROMPTS)
    stats = proposer.stats()
    assert stats["lanes"] == len(PROMPTS) and stats["drafted"] > 0
    # moved rows found their own lanes again: a lane was chosen afresh only on a request's first draft
    assert stats["switches"] == len(PROMPTS)


def test_a_lookup_in_front_of_the_served_chain(tiny_models: dict[str, Any], dirs: dict[str, Path]) -> None:
    """``lookup="ngram"`` travels with the lower chain to vLLM's workers; each lane asks prompt
    lookup first and the draft drafts only where it finds nothing: outputs stay the target's, and
    every block is what a fresh lane drafts for that context."""
    spec = PipelineSpec(stages=[f"hf:path={dirs['near']}", f"hf:path={dirs['target']}"], policies=["exact"],
                        block_lengths=[K], lookup="ngram")
    chain = LowerChain.of(spec, adaptive=False)[0]
    assert chain.lookup == "ngram" and LowerChain.from_json(chain.to_json()) == chain
    lane = build_lower(chain, VOCAB)
    assert isinstance(lane, LookupFirst)
    repeating = [1, 2, 1, 2, 1, 2]
    assert lane.propose(torch.tensor(repeating), K, Rng(0)).tokens.tolist() == [1, 2]  # what followed 2, 1, 2
    assert lane.stats.hits == 1
    proposer = PyramidProposer.for_chain(chain, num_speculative_tokens=K, vocab_size=VOCAB, max_model_len=96)
    out = FakeRunner(tiny_models["target"], PROMPTS, new_tokens=20).run(proposer)
    for prompt, got in zip(PROMPTS, out, strict=True):
        assert got == plain_greedy(tiny_models["target"], prompt, 20)
    with pytest.raises(ConfigError, match=r"lookup='hf:path=/d' names a model backend"):
        LowerChain.of(PipelineSpec(stages=["hf:path=/d", "hf:path=/t"], lookup="hf:path=/d"))


def test_the_lookup_is_asked_for_every_row_and_cut_row_by_row(dirs: dict[str, Path]) -> None:
    """Where every token costs the engine a fifth of a step and drafting does not pay, a row whose context repeats
    a long run still gets the lookup's block (its support bucket has been accepting), a row with
    no match gets nothing; the lookup's verdict moves its own bucket's acceptance, position by
    position."""
    spec = PipelineSpec(stages=[f"hf:path={dirs['near']}", f"hf:path={dirs['target']}"], policies=["exact"],
                        block_lengths=[K], lookup="ngram")
    proposer = PyramidProposer.for_chain(LowerChain.of(spec)[0], num_speculative_tokens=K, vocab_size=VOCAB,
                                         max_model_len=96)
    planner = proposer.planner
    for tokens in (2, 10, 6, 2):  # 10 ms a step and 2 ms a token: each token costs a fifth of a row's step
        planner.record_step(tokens, 0.010 + 0.002 * tokens, drafted=tokens > 2)
    planner.record_draft(4, 0.2)  # 50 ms a drafted token
    repeating, fresh = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5], [40, 41, 42]
    bucket = support_bucket(support(np.array(repeating), 6))
    assert SUPPORT_EDGES[bucket] == 6  # 5, 6 follows "6 7 8 9 5" once already: a run of six
    for _ in range(30):
        planner.record_verdict(K, K, bucket=bucket)
    contexts = [repeating, fresh]
    table = np.zeros((2, 96), dtype=np.int32)
    for i, c in enumerate(contexts):
        table[i, : len(c)] = c
    assert proposer.propose([[c[-1]] for c in contexts], np.array([len(c) for c in contexts]), table) == \
        [[6, 7, 8, 9], []]
    assert proposer.looker is not None and proposer.looker.stats.tries == 2 and proposer.looker.stats.hits == 1
    # the next step: the repeating row accepted 2 of its 4 (context grew by 3)
    grown = [[*repeating, 6, 7, 3], [*fresh, 3]]
    table = np.zeros((2, 96), dtype=np.int32)
    for i, c in enumerate(grown):
        table[i, : len(c)] = c
    before = [list(cell) for cell in planner.lookup_by_support[bucket]]
    proposer.propose([[c[-1]] for c in grown], np.array([len(c) for c in grown]), table)
    assert proposer.stats()["verdicts"] == {"blocks": 1, "lookup blocks": 1, "offered": 4, "accepted": 2}
    # what was observed weighted by 0.95^(1/8) (the prior's share kept), plus the verdict; a bucket
    # that had a verdict is not aged toward its prior in that step, another one is
    per_verdict, prior = 0.95 ** (1 / 8), (0.5 * 2.0, 2.0)
    after = planner.lookup_by_support[bucket]
    for j, (was, now) in enumerate(zip(before, after, strict=True)):  # positions 1, 2 accepted, 3 tested, 4 not
        assert now == pytest.approx([p + per_verdict * (w - p) + n
                                     for w, p, n in zip(was, prior, (j < 2, j < 3), strict=True)])
    assert planner.lookup_by_support[bucket - 1][0] == pytest.approx([1.0, 2.0])  # never observed: its prior


def test_support_is_the_run_a_proposal_continues() -> None:
    ctx = np.array([1, 2, 3, 4, 9, 2, 3, 4])
    assert support(ctx, 9) == 3  # "2 3 4" then 9 stood at positions 1-4
    assert support(ctx, 2) == 0  # 2 never follows a 4 here
    assert support(ctx, 7) == 0  # never seen
    assert support(np.array([3, 3, 3, 3]), 3) == 3  # overlapping runs count
    assert support(np.array([1, 2, 3] * 5), 1, cap=4) == 4
    assert [support_bucket(n) for n in range(10)] == [0, 1, 2, 3, 4, 4, 5, 5, 6, 6]


def test_an_estimate_not_observed_returns_to_its_prior_and_is_tried_again() -> None:
    """Once drafting stops paying, no drafted verdict arrives to say whether it pays again; each
    step ages every acceptance estimate toward its prior, so the planner drafts again after a
    while (and measures)."""
    planner = StepPlanner(K)
    for tokens in (1, 3, 5, 1):  # 20 ms a step, 1 ms a token
        planner.record_step(tokens, 0.020 + 0.001 * tokens, drafted=tokens > 1)
    planner.record_draft(10, 0.02)  # 2 ms a drafted token
    for _ in range(200):
        planner.record_verdict(K, 0)
    assert planner.alpha < 0.05 and planner.choose(1) == 0
    steps = next(n for n in range(1, 2000) if planner.choose(1) > 0)
    assert 20 < steps < 1000 and 0.1 < planner.alpha < 0.5


@pytest.mark.parametrize("seed", range(12))
def test_the_planner_plans_the_fastest_step(seed: int) -> None:
    """Dinkelbach's iteration finds the most tokens per second over every assignment of blocks
    to rows (a prefix of the lookup's block, a drafted block, or none), checked by enumeration."""
    gen = np.random.default_rng(seed)
    k = 3
    planner = StepPlanner(k, memory=1.0, prior_weight=1e-9)
    a0 = float(gen.uniform(0.0, 0.05))
    a1, b, d = a0 + float(gen.uniform(0.0, 0.01)), float(gen.uniform(1e-4, 5e-3)), float(gen.uniform(0.0, 5e-3))
    for n in (3, 9, 6):
        planner.record_step(n, a1 + b * n, drafted=True)
    planner.record_step(3, a0 + b * 3, drafted=False)
    planner.record_draft(100, 100 * d)
    planner.accepted, planner.tested = float(gen.uniform(0.1, 0.9)), 1.0
    for bucket in range(len(SUPPORT_EDGES)):
        for cell in planner.lookup_by_support[bucket]:
            cell[:] = [float(gen.uniform(0.05, 1.0)), 1.0]
    offers = [Offer(int(gen.integers(1, k + 1)), int(gen.integers(0, k + 1)), int(gen.integers(0, len(SUPPORT_EDGES))))
              for _ in range(3)]

    def options(o: Offer) -> list[tuple[int, bool]]:
        return [(0, False)] + [(j, True) for j in range(1, min(o.lookup, o.room) + 1)] + \
            [(j, False) for j in range(1, min(k, o.room) + 1)]

    def rate(choice: Sequence[tuple[int, bool]]) -> float:
        tokens, seconds = float(len(offers)), (a1 if any(n for n, _ in choice) else a0) + b * len(offers)
        for o, (n, looked) in zip(offers, choice, strict=True):
            c = planner.lookup_cumulative(o.bucket) if looked else [planner.alpha ** j for j in range(1, k + 1)]
            tokens += sum(c[:n])
            seconds += (b if looked else b + d) * n
        return tokens / seconds

    best = max(rate(c) for c in itertools.product(*(options(o) for o in offers)))
    got = planner.plan(offers)
    assert rate(got) == pytest.approx(best, rel=1e-9)
    assert all(n <= o.room and (n <= o.lookup or not looked) for o, (n, looked) in zip(offers, got, strict=True))


def test_requests_one_after_another_reuse_one_lane(tiny_models: dict[str, Any], dirs: dict[str, Path]) -> None:
    """A finished request's lane serves the next one (no copy of the chain is built per request);
    the reused lane rolls back to the common prefix, and outputs stay the target's."""
    proposer = PyramidProposer.for_chain(chain_of(dirs), num_speculative_tokens=K, vocab_size=VOCAB,
                                         max_model_len=96, max_num_seqs=8)
    for prompt in PROMPTS:
        runner = FakeRunner(tiny_models["target"], [prompt], new_tokens=12)
        assert runner.run(proposer) == [plain_greedy(tiny_models["target"], prompt, 12)]
    assert proposer.stats()["lanes"] == 1 and proposer.stats()["switches"] == len(PROMPTS)


def test_a_returning_request_keeps_its_lane_whatever_its_row() -> None:
    """Rows that extend a lane keep it before new requests take lanes: a new request in an
    earlier row does not take the lane of a request that is still running."""
    proposer = PyramidProposer.for_chain(LowerChain(("ngram",), adaptive=False), num_speculative_tokens=K,
                                         vocab_size=VOCAB, max_model_len=32, max_num_seqs=2)

    def step(contexts: list[list[int]]) -> None:
        table = np.zeros((len(contexts), 32), dtype=np.int32)
        for i, c in enumerate(contexts):
            table[i, : len(c)] = c
        proposer.propose([[c[-1]] for c in contexts], np.array([len(c) for c in contexts]), table)

    b, a, c = [7, 8, 9, 7, 8], [1, 2, 3, 1, 2], [5, 6, 5, 6]
    step([b, a])
    lane_of_b = proposer.lanes.by_row[0]
    step([c, [*b, 9]])  # a finished; c arrives in row 0, b moved to row 1
    assert proposer.lanes.by_row[1] is lane_of_b
    assert proposer.stats()["switches"] == 3 and proposer.stats()["lanes"] == 2


def test_each_block_is_what_a_fresh_chain_drafts_for_that_context(dirs: dict[str, Path]) -> None:
    chain = chain_of(dirs)
    proposer = PyramidProposer.for_chain(chain, num_speculative_tokens=K, vocab_size=VOCAB, max_model_len=96,
                                         max_num_seqs=2)
    assert proposer.lanes.capacity == 2
    contexts = [[3, 5, 7, 9], [40, 41, 3], [3, 5, 7, 9, 1, 1], [40, 41, 3, 8], [63, 0, 17, 5]]
    for step in range(len(contexts) - 1):  # two rows a step, contexts that extend, roll back or change
        rows = [contexts[step], contexts[step + 1]]
        table = np.zeros((2, 96), dtype=np.int32)
        for i, c in enumerate(rows):
            table[i, : len(c)] = c
        drafts = proposer.propose([[c[-1]] for c in rows], np.array([len(c) for c in rows]), table)
        for c, d in zip(rows, drafts, strict=True):
            fresh = build_lower(chain, VOCAB).propose(torch.tensor(c), K, Rng(0)).tokens.tolist()
            assert d == fresh and len(d) == K
    assert proposer.stats()["lanes"] == 2  # the cap: the least recently used lane was reused


def test_rows_without_room_or_without_a_sampled_token_get_no_draft(dirs: dict[str, Path]) -> None:
    proposer = PyramidProposer.for_chain(LowerChain(("ngram",)), num_speculative_tokens=K, vocab_size=VOCAB,
                                         max_model_len=12)
    table = np.zeros((3, 12), dtype=np.int32)
    table[:, :10] = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]
    drafts = proposer.propose([[1], [], [1]], np.array([10, 10, 11]), table)
    assert drafts[1] == [] and drafts[2] == []
    assert drafts[0] == [2]  # one position left before max_model_len - 1


def test_more_rows_than_lanes_is_a_clear_error() -> None:
    proposer = PyramidProposer.for_chain(LowerChain(("ngram",), max_lanes=1), num_speculative_tokens=K,
                                         vocab_size=VOCAB, max_model_len=32)
    table = np.ones((2, 32), dtype=np.int32)
    with pytest.raises(ConfigError, match="more rows in one step than the proposer's 1 lanes"):
        proposer.propose([[1], [1]], np.array([5, 6]), table)


def fake_python(tmp_path: Path, status: int = 0) -> Path:
    """An interpreter standing in for vLLM's: it records its arguments and the lower chain it was
    handed, and exits with ``status``."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/argv\nprintf '%s' \"${CHAIN_ENV}\" > {tmp_path}/chain\n"
                    f"exit {status}\n")
    fake.chmod(0o755)
    return fake


def serve_argv(dirs: dict[str, Path], python: Path) -> list[str]:
    return ["serve", "--stage", "ngram", "--stage", f"hf:path={dirs['near']}", "--stage", f"hf:path={dirs['target']}",
            "--policy", "fuzzy:tau=0.3", "--policy", "exact", "--length", "3", "--length", "5",
            "--vllm-python", str(python), "--dtype", "float32", "--max-num-seqs", "8", "--port", "0"]


def test_serve_starts_vllm_with_the_lower_chain(dirs: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from pyramid_core.cli import main

    assert main([*serve_argv(dirs, fake_python(tmp_path)), "--", "--enforce-eager"]) == 0
    assert "proposer: ngram -> hf:path=" in capsys.readouterr().out
    argv = (tmp_path / "argv").read_text().split("\n")
    assert argv[:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(dirs["target"])]
    speculative = json.loads(argv[argv.index("--speculative-config") + 1])
    assert speculative == {"method": "custom_class", "model": "pyramid_core.serving.proposer.PyramidProposer",
                           "num_speculative_tokens": 5, "rejection_sample_method": "standard"}
    assert argv[argv.index("--dtype") + 1] == "float32" and argv[argv.index("--max-num-seqs") + 1] == "8"
    assert "--enforce-eager" in argv
    chain = LowerChain.from_json((tmp_path / "chain").read_text())
    assert chain == LowerChain(("ngram", f"hf:path={dirs['near']}"), ("fuzzy:tau=0.3",), (3,), "cpu", "float32",
                               None, 8, adaptive=True)
    assert main([*serve_argv(dirs, fake_python(tmp_path)), "--fixed-length"]) == 0
    assert not LowerChain.from_json((tmp_path / "chain").read_text()).adaptive


def test_serve_prints_its_command(dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyramid_core.cli import main

    assert main([*serve_argv(dirs, tmp_path / "python"), "--print-command"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{CHAIN_ENV}='") and "custom_class" in out and not (tmp_path / "argv").exists()
    assert main([*serve_argv(dirs, tmp_path / "python"), "--lookup", "ngram:min_ngram=2", "--print-command"]) == 0
    assert '"lookup": "ngram:min_ngram=2"' in capsys.readouterr().out  # the lanes ask it first


@pytest.mark.parametrize(("change", "message"), [
    ({"--stage": "hf:path=/nowhere/target"}, "not a Hugging Face model directory"),
    ({"--policy": "fuzzy:tau=0.2"}, "vLLM's own rejection sampler"),
    ({"--vllm-python": ""}, "--vllm-python PATH"),
])
def test_serve_names_what_is_wrong(dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   change: dict[str, str], message: str) -> None:
    from pyramid_core.cli import main

    argv = serve_argv(dirs, fake_python(tmp_path))
    for flag, value in change.items():
        argv[len(argv) - 1 - argv[::-1].index(flag) + 1] = value  # the flag's last occurrence
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_server_that_fails_is_an_error(dirs: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from pyramid_core.cli import main

    assert main([*serve_argv(dirs, fake_python(tmp_path, status=4)), "--log", str(tmp_path / "log")]) == 2
    assert f"exited with status 4; see {tmp_path / 'log'}" in capsys.readouterr().err


# --- the planner: each step's block length from measured costs ----------------------------------


def test_the_planner_reads_acceptance_by_maximum_likelihood() -> None:
    gen = np.random.default_rng(0)
    planner = StepPlanner(6, memory=1.0, prior_weight=1e-9)
    for _ in range(4000):  # i.i.d. acceptance at 0.7, blocks of 1..6
        offered = int(gen.integers(1, 7))
        accepted = next((j for j in range(offered) if gen.random() >= 0.7), offered)
        planner.record_verdict(offered, accepted)
    assert planner.alpha == pytest.approx(0.7, abs=0.02)
    with pytest.raises(ConfigError, match="accepted 5 of a block of 4"):
        planner.record_verdict(4, 5)


def test_the_planner_fits_the_engines_step_time() -> None:
    planner = StepPlanner(4, memory=1.0)
    assert planner.step_cost() is None and planner.rate(8, 2) is None
    planner.record_step(8, 0.15 + 0.01 * 8)
    # one step seen: extra tokens count as free, and a step without drafts costs the same
    assert planner.step_cost() == pytest.approx((0.23, 0.23, 0.0))
    for n in (8, 16, 24, 40, 8, 40):  # steps with drafts cost 0.05 more than the line through plain steps
        planner.record_step(n, 0.15 + 0.01 * n, drafted=True)
    for n in (8, 8, 4):
        planner.record_step(n, 0.1 + 0.01 * n, drafted=False)
    assert planner.step_cost() == pytest.approx((0.1, 0.15, 0.01), rel=0.02)


@pytest.mark.parametrize(("rows", "a", "jump", "b", "d", "alpha"), [
    (1, 0.05, 0.0, 1e-4, 0.004, 0.6),  # one request on a CPU: drafting pays
    (1, 0.02, 0.015, 1e-4, 0.005, 0.45),  # ... unless a step with drafts costs vLLM much more than one without
    (32, 0.2, 0.0, 0.003, 0.005, 0.45),  # many requests, lanes drafting one after another: it does not
    (8, 0.1, 0.01, 0.002, 0.001, 0.8),
    (4, 0.0, 0.0, 0.01, 0.0, 0.5),  # the engine's cost is all per token: plain decoding
])
def test_the_planner_chooses_the_fastest_block_length(rows: int, a: float, jump: float, b: float, d: float,
                                                      alpha: float) -> None:
    planner = StepPlanner(6, memory=1.0, prior_weight=1e-9)
    assert planner.choose(rows) == 6  # nothing measured yet: draft, and so measure
    for n in (rows * 3, rows * 7, rows * 5):
        planner.record_step(n, a + jump + b * n, drafted=True)
    planner.record_draft(100, 100 * d)
    assert planner.choose(rows) == 0  # then one step without drafts, to time that kind
    planner.record_step(rows, a + b * rows, drafted=False)
    planner.accepted, planner.tested = alpha, 1.0
    truth = [rows * expected_tokens(alpha, k) / (a + (jump if k else 0.0) + b * rows * (1 + k) + d * rows * k)
             for k in range(7)]
    assert planner.choose(rows) == int(np.argmax(truth))


@pytest.mark.parametrize(("step_cost", "adaptive", "drafting"),
                         [((1.0, 0.001), True, True), ((0.0, 1.0), True, False), ((0.0, 1.0), False, True)],
                         ids=["fixed-cost-steps", "per-token-steps", "per-token-steps-fixed-length"])
def test_the_proposer_learns_from_vllms_steps(tiny_models: dict[str, Any], dirs: dict[str, Path],
                                             step_cost: tuple[float, float], adaptive: bool, drafting: bool) -> None:
    proposer = PyramidProposer.for_chain(chain_of(dirs, three=False, adaptive=adaptive), num_speculative_tokens=K,
                                         vocab_size=VOCAB, max_model_len=96)
    proposer.planner = planner = StepPlanner(K, memory=1.0, prior_weight=1e-9)
    runner = FakeRunner(tiny_models["target"], PROMPTS, new_tokens=24, step_cost=step_cost)
    proposer.clock = lambda: runner.time  # drafting takes no time on this clock: only the engine's steps count
    out = runner.run(proposer)
    for prompt, got in zip(PROMPTS, out, strict=True):
        assert got == plain_greedy(tiny_models["target"], prompt, 24)  # whatever it chooses, output is the target's
    # every verdict vLLM's step implied was read, and nothing else
    offered, accepted = sum(o for o, _ in runner.verdicts), sum(a for _, a in runner.verdicts)
    tested = sum(a + (a < o) for o, a in runner.verdicts)
    assert (planner.accepted, planner.tested) == (pytest.approx(accepted), pytest.approx(tested))
    a0, a1, b = planner.step_cost()  # type: ignore[misc]
    assert (a0, a1, b) == pytest.approx((step_cost[0], step_cost[0], step_cost[1]), abs=5e-3)
    later = sum(n for k, n in planner.chosen.items() if k > 0)
    assert proposer.stats()["verdicts"] == {"blocks": len(runner.verdicts), "lookup blocks": 0, "offered": offered,
                                            "accepted": accepted}
    if drafting and adaptive:  # steps cost the same whatever their size: the longest block (and at most
        assert set(planner.chosen) <= {K, 0} and planner.chosen.get(0, 0) <= 1  # one step to time a plain step)
    elif drafting:
        assert planner.chosen == {K: planner.chosen[K]}
    else:  # every token costs: after the first blocks, plain decoding
        assert planner.chosen.get(0, 0) > later and offered > 0
