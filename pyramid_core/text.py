"""Text in, text out, through the target's tokenizer (``Pipeline.generate_text``).

The tokenizer is Hugging Face-style (``HasTokenizer``) and is only called, never imported:
``__call__`` to encode, ``apply_chat_template`` and ``chat_template`` for chat prompts,
``decode`` for the output. Decoding keeps ``clean_up_tokenization_spaces`` off, so the text of a
prefix of the tokens is a prefix of the text, which streaming relies on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from torch import Tensor

from pyramid_core.errors import ConfigError

__all__ = ["Messages", "TextStream", "decode_text", "encode_prompt"]

#: A chat: ``[{"role": "user", "content": "..."}, ...]``.
Messages = Sequence[Mapping[str, str]]


def _messages(prompt: object) -> list[dict[str, str]]:
    if not isinstance(prompt, Sequence) or isinstance(prompt, (str, bytes)) or not prompt:
        raise ConfigError(f"a prompt is a str or a non-empty list of chat messages, got {prompt!r}")
    for i, m in enumerate(prompt):
        if not isinstance(m, Mapping) or not {"role", "content"} <= set(m):
            raise ConfigError(f"chat message {i} must be a mapping with 'role' and 'content', got {m!r}")
    return [dict(m) for m in prompt]


def encode_prompt(tokenizer: Any, prompt: str | Messages, chat: bool | None, stage: str) -> list[int]:
    """Token ids of ``prompt``: through the chat template (with the generation prompt) when
    ``chat`` is true, or ``None`` and the tokenizer has a template, or ``prompt`` is a list of
    messages; else the raw text with the tokenizer's special tokens (a BOS). ``stage`` names the
    tokenizer's stage in errors."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str):
        use_template = has_template if chat is None else bool(chat)
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = _messages(prompt)
        if chat is False:
            raise ConfigError("chat=False takes a str prompt; a list of chat messages always goes through the "
                              "chat template (pass the text, or chat=None)")
        use_template = True
    if use_template and not has_template:
        raise ConfigError(f"the tokenizer of {stage} has no chat template, so it cannot encode a chat; "
                          "pass a str prompt with chat=False")
    if use_template:
        # the template writes the special tokens itself: encode its text without adding more
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    return [int(i) for i in ids]


def decode_text(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """The text of ``ids`` (tokenization-space clean-up off: module docstring)."""
    return str(tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens,
                                clean_up_tokenization_spaces=False))


@attrs.define(eq=False)
class TextStream:
    """An ``on_block`` callback that hands ``on_text`` each new piece of the decoded output.

    Each call decodes the whole output so far and sends what follows the text already sent,
    holding back a trailing U+FFFD (a character whose bytes have not all arrived); ``finish``
    sends the rest. The pieces concatenate to ``finish()``'s text wherever decoding is
    prefix-stable (byte-level BPE and SentencePiece tokenizers are)."""

    tokenizer: Any
    on_text: Callable[[str], object]
    skip_special_tokens: bool = True
    ids: list[int] = attrs.field(factory=list)
    sent: str = ""

    def __call__(self, tokens: Tensor) -> None:
        self.ids.extend(int(t) for t in tokens.tolist())
        self._send(decode_text(self.tokenizer, self.ids, self.skip_special_tokens).rstrip("\ufffd"))

    def finish(self) -> str:
        """The whole text; sends what was held back."""
        text = decode_text(self.tokenizer, self.ids, self.skip_special_tokens)
        self._send(text)
        return text

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text
