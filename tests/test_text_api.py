"""Text in, text out: the streaming callback ``on_block``, ``Pipeline.generate_text`` and the
options read from a Hugging Face ``GenerationConfig``.

``on_block`` is checked on ``TableModel`` pipelines over 20 seeds each (the concatenation of the
calls equals the output exactly, one call per round of the target); ``generate_text`` on a byte
tokenizer (a character split over two tokens) and on the real SmolLM2-135M (``slow``)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor

from pyramid_core import (
    ConfigError,
    GenerationOptions,
    SamplingConfig,
    TextGeneration,
    build_pipeline,
)
from pyramid_core.testing import TableModel
from pyramid_core.text import TextStream, encode_prompt

P = [0.1, 0.3, 0.2, 0.4]
Q = [0.4, 0.3, 0.2, 0.1]
R = [0.25, 0.25, 0.25, 0.25]
SEEDS = range(20)


def collect(pieces: list[Tensor]) -> Any:
    return lambda tokens: pieces.append(tokens.clone())


def run(pipe: Any, n: int, seed: int) -> tuple[Any, list[Tensor]]:
    pieces: list[Tensor] = []
    out = pipe.generate([0], n, seed=seed, on_block=collect(pieces))
    return out, pieces


# --- on_block ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("tables", "lengths"), [([Q, P], [3]), ([R, Q, P], [2, 5])], ids=["2 stages", "3 stages"])
def test_on_block_pieces_concatenate_to_the_output_one_per_round(tables: list[list[float]], lengths: list[int]) -> None:
    pipe = build_pipeline([TableModel(t) for t in tables], ["exact"] * len(lengths), lengths)
    for seed in SEEDS:
        out, pieces = run(pipe, 17, seed)
        assert torch.equal(torch.cat(pieces), out.tokens) and len(out.tokens) == 17
        assert len(pieces) == out.metrics.boundaries[-1].rounds
        assert all(len(p) >= 1 for p in pieces)
        # the callback only watches: the same seed gives the same tokens without it
        assert pipe.generate([0], 17, seed=seed).token_list == out.token_list


def test_on_block_sees_the_cut_at_max_new_tokens() -> None:
    """Block length 4 and n = 6: a round that accepts all 4 and emits a fifth token passes n; the
    callback gets only the tokens that reach the output."""
    pipe = build_pipeline([TableModel(P), TableModel(P)], ["exact"], [4])  # q = p: all accepted
    for seed in SEEDS:
        out, pieces = run(pipe, 6, seed)
        assert [len(p) for p in pieces] == [5, 1]
        assert torch.equal(torch.cat(pieces), out.tokens)


def test_on_block_sees_the_cut_at_a_stop_token() -> None:
    pipe = build_pipeline([TableModel(Q), TableModel(P)], ["exact"], [3], stop_ids=[3])
    stopped = 0
    for seed in SEEDS:
        out, pieces = run(pipe, 30, seed)
        assert torch.equal(torch.cat(pieces), out.tokens)
        assert len(pieces) == out.metrics.boundaries[-1].rounds
        assert 3 not in out.token_list[:-1]
        stopped += out.token_list[-1] == 3
    assert stopped >= 18  # P(no 3 in 30 tokens) = 0.6^30


def test_on_block_is_called_per_token_without_a_draft() -> None:
    pipe = build_pipeline([TableModel(P)], stop_ids=[3])
    for seed in SEEDS:
        out, pieces = run(pipe, 9, seed)
        assert [len(p) for p in pieces] == [1] * len(out.tokens)
        assert torch.equal(torch.cat(pieces), out.tokens)
        assert len(pieces) == out.metrics.target_forwards


def test_on_block_is_not_called_for_zero_tokens_and_must_be_callable() -> None:
    pipe = build_pipeline([TableModel(Q), TableModel(P)], ["exact"], [3])
    out, pieces = run(pipe, 0, 0)
    assert pieces == [] and out.token_list == []
    with pytest.raises(ConfigError, match="on_block must be a callable"):
        pipe.generate([0], 3, on_block=[])  # type: ignore[arg-type]


# --- generate_text on a byte tokenizer ------------------------------------------------------------


class ByteTokenizer:
    """Token t is the bytes ``PIECES[t]``; 'é' is split over tokens 1 and 2 (its two UTF-8 bytes)."""

    PIECES = [b"a", b"\xc3", b"\xa9", b"!", b"</s>"]
    eos_token_id = 4
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [self.PIECES.index(bytes([b])) for b in text.encode()]}

    def get_vocab(self) -> dict[str, int]:
        return {repr(b): t for t, b in enumerate(self.PIECES)}

    def decode(self, ids: list[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = True) -> str:
        keep = [t for t in ids if not (skip_special_tokens and t == self.eos_token_id)]
        return b"".join(self.PIECES[t] for t in keep).decode("utf-8", errors="replace")


def byte_pipeline(lengths: list[int]) -> Any:
    """Greedy, deterministic: after token t comes t + 1 (a -> 0xc3 -> 0xa9 -> ! -> </s>)."""
    table = torch.full((5, 5), 0.01)
    for t in range(5):
        table[t, min(t + 1, 4)] = 0.96
    stages = [TableModel(table.tolist(), name=f"bytes{i}") for i in range(len(lengths) + 1)]
    for s in stages:
        s.tokenizer = ByteTokenizer()  # type: ignore[attr-defined]
    return build_pipeline(stages, ["exact"] * len(lengths), lengths, sampling=SamplingConfig.greedy(), stop_ids=[4])


@pytest.mark.parametrize("lengths", [[], [1], [3]], ids=["N=1", "block 1", "block 3"])
def test_on_text_never_breaks_a_character(lengths: list[int]) -> None:
    pipe = byte_pipeline(lengths)
    pieces: list[str] = []
    res = pipe.generate_text("a", 10, chat=False, on_text=pieces.append)
    assert isinstance(res, TextGeneration)
    assert res.prompt_ids == [0] and res.generation.token_list == [1, 2, 3, 4]
    assert res.text == "é!" and "".join(pieces) == res.text
    assert not any("\ufffd" in p for p in pieces)
    assert pipe.generate_text("a", 10, chat=False).text == "é!"  # the same without streaming
    assert pipe.generate_text("a", 10, chat=False, skip_special_tokens=False).text == "é!</s>"


def test_a_character_cut_by_max_new_tokens_is_sent_at_the_end() -> None:
    pieces: list[str] = []
    res = byte_pipeline([]).generate_text("a", 1, on_text=pieces.append)  # only the first byte of 'é'
    assert res.text == "\ufffd" and pieces == ["\ufffd"]


def test_text_stream_holds_back_an_incomplete_character() -> None:
    pieces: list[str] = []
    stream = TextStream(ByteTokenizer(), pieces.append)
    stream(torch.tensor([0, 1]))
    assert pieces == ["a"]
    stream(torch.tensor([2]))
    assert pieces == ["a", "é"]
    assert stream.finish() == "aé" and pieces == ["a", "é"]


def test_generate_text_without_a_tokenizer_names_the_target() -> None:
    pipe = build_pipeline([TableModel(Q, name="draft"), TableModel(P, name="tab-target")], ["exact"], [3])
    with pytest.raises(ConfigError, match=r"generate_text needs a tokenizer.*tab-target.*call generate\(ids"):
        pipe.generate_text("hi", 3)


def test_chat_needs_a_template_and_messages_need_the_template() -> None:
    tok = ByteTokenizer()
    assert encode_prompt(tok, "a!", None, "s") == [0, 3]  # no template: the raw text
    with pytest.raises(ConfigError, match=r"the tokenizer of s has no chat template.*chat=False"):
        encode_prompt(tok, "a", True, "s")
    with pytest.raises(ConfigError, match=r"the tokenizer of s has no chat template"):
        encode_prompt(tok, [{"role": "user", "content": "a"}], None, "s")
    with pytest.raises(ConfigError, match=r"chat=False takes a str prompt"):
        encode_prompt(tok, [{"role": "user", "content": "a"}], False, "s")
    with pytest.raises(ConfigError, match=r"chat message 0 must be a mapping with 'role' and 'content'"):
        encode_prompt(tok, [{"text": "a"}], None, "s")
    with pytest.raises(ConfigError, match=r"a prompt is a str or a non-empty list of chat messages"):
        encode_prompt(tok, [], None, "s")


# --- GenerationConfig ----------------------------------------------------------------------------


def test_sampling_from_a_generation_config() -> None:
    from transformers import GenerationConfig

    assert SamplingConfig.from_generation_config(GenerationConfig()) == SamplingConfig.greedy()
    assert SamplingConfig.from_generation_config(GenerationConfig(do_sample=False, temperature=0.7)).is_greedy
    gc = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    assert SamplingConfig.from_generation_config(gc) == SamplingConfig(0.7, 20, 0.9)
    # unset values take Hugging Face's defaults (top_k 50), as model.generate does
    assert SamplingConfig.from_generation_config(GenerationConfig(do_sample=True)) == SamplingConfig(1.0, 50, 1.0)
    # duck-typed: any object with the attributes
    duck = SimpleNamespace(do_sample=True, temperature=0.5, top_k=0, top_p=1.0)
    assert SamplingConfig.from_generation_config(duck) == SamplingConfig(0.5, 0, 1.0)


def test_generation_options_from_a_generation_config() -> None:
    from transformers import GenerationConfig

    opts = GenerationOptions.from_generation_config(GenerationConfig(max_new_tokens=12, eos_token_id=2))
    assert opts == GenerationOptions(SamplingConfig.greedy(), 12, (2,))
    opts = GenerationOptions.from_generation_config(GenerationConfig(do_sample=True, eos_token_id=[2, 3]))
    assert opts.stop_ids == (2, 3) and opts.max_new_tokens is None and opts.sampling.top_k == 50
    assert GenerationOptions.from_generation_config(GenerationConfig()).stop_ids is None
    pipe = build_pipeline([TableModel(Q), TableModel(P)], ["exact"], [3], sampling=opts.sampling,
                          stop_ids=opts.stop_ids)
    assert list(pipe.stop_ids) == [2, 3] and pipe.sampling.top_k == 50
    with pytest.raises(ConfigError, match=r"eos_token_id must be a token id or a list of them, got '2'"):
        GenerationOptions.from_generation_config(SimpleNamespace(eos_token_id="2"))


@pytest.mark.parametrize(("setting", "value"), [
    ("repetition_penalty", 1.2), ("num_beams", 4), ("min_new_tokens", 3), ("no_repeat_ngram_size", 2),
    ("typical_p", 0.9), ("min_p", 0.05), ("bad_words_ids", [[1]]), ("stop_strings", ["\n"]),
])
def test_a_setting_that_would_change_the_output_is_refused_by_name(setting: str, value: Any) -> None:
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=True, **{setting: value})
    for read in (SamplingConfig.from_generation_config, GenerationOptions.from_generation_config):
        with pytest.raises(ConfigError, match=rf"generation config sets {setting}=.*would change the output"):
            read(gc)


def test_neutral_values_of_unsupported_settings_are_accepted() -> None:
    from transformers import GenerationConfig

    gc = GenerationConfig(repetition_penalty=1.0, num_beams=1, no_repeat_ngram_size=0, min_new_tokens=0,
                          bad_words_ids=None)
    assert SamplingConfig.from_generation_config(gc).is_greedy


# --- the real model ------------------------------------------------------------------------------

QUESTION = "What is the capital of France?"
NEW = 8


@pytest.fixture(scope="module")
def smol() -> Any:
    from pyramid_core.backends.hf import ensure_smollm2

    ensure_smollm2(progress=False)
    pipe = build_pipeline(["smollm2:num_layers=8", "smollm2"], ["exact"], [3], sampling=SamplingConfig.greedy())
    return pipe, pipe.target.tokenizer  # type: ignore[attr-defined]


@pytest.mark.slow
def test_generate_text_is_generate_then_decode(smol: Any) -> None:
    pipe, tok = smol
    pieces: list[str] = []
    res = pipe.generate_text(QUESTION, NEW, on_text=pieces.append)
    out = pipe.generate(res.prompt_ids, NEW)
    assert res.generation.token_list == out.token_list and len(out.token_list) == NEW
    assert res.text == tok.decode(out.token_list, skip_special_tokens=True)
    # a round whose tokens add no text (the EOS, skipped) sends nothing
    assert "".join(pieces) == res.text and 1 < len(pieces) <= res.metrics.boundaries[-1].rounds
    assert "Paris" in res.text


@pytest.mark.slow
def test_generate_text_applies_the_chat_template(smol: Any) -> None:
    pipe, tok = smol
    chat = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)
    templated = tok(chat, add_special_tokens=False)["input_ids"]
    assert pipe.generate_text(QUESTION, 1).prompt_ids == templated  # chat=None: the tokenizer has a template
    assert pipe.generate_text([{"role": "user", "content": QUESTION}], 1).prompt_ids == templated
    assert pipe.generate_text(QUESTION, 1, chat=False).prompt_ids == tok(QUESTION)["input_ids"]


@pytest.mark.slow
def test_the_models_generation_config_reads_as_greedy_stopping_at_eos(smol: Any) -> None:
    pipe, tok = smol
    opts = GenerationOptions.from_generation_config(pipe.target.model.generation_config)
    assert opts.sampling.is_greedy and opts.stop_ids == (tok.eos_token_id,)
