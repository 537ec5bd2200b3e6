"""Tiny random Hugging Face models and word-level tokenizers, built offline (tests, tutorials).

Weights are drawn with a larger spread than the default initialisation so that greedy decoding
has clear argmax margins (float noise between a cached and an uncached forward cannot flip a
token), which makes token-identity tests meaningful.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["tiny_llama", "perturbed", "word_tokenizer", "save_with_words"]


def tiny_llama(
    seed: int,
    *,
    vocab_size: int = 64,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    init_std: float = 0.3,
) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` (float32, eval mode, no special tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        initializer_range=init_std,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, init_std)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = None
    return model.eval()


def perturbed(model: Any, seed: int, scale: float = 0.1) -> Any:
    """A copy of ``model`` with relative Gaussian noise on every matrix: a draft that agrees with
    ``model`` often but not always."""
    import copy

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            if param.dim() >= 2:
                noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
                param.add_(noise.to(param.device) * scale * param.std())
    return other.eval()


def word_tokenizer(words: Sequence[str]) -> Any:
    """A ``PreTrainedTokenizerFast`` with one id per word (whitespace pre-tokenisation);
    ``words[0]`` is the unknown token. ``len(tokenizer) == len(words)``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    if len(vocab) != len(words):
        raise ValueError("word_tokenizer: words must be distinct")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast: Any = PreTrainedTokenizerFast  # untyped constructor
    return fast(tokenizer_object=tok, unk_token=words[0])


def save_with_words(model: Any, path: Any) -> Any:
    """Save ``model`` and a word tokenizer over its vocabulary (``w0``, ``w1``, ...) to ``path``
    as a Hugging Face model directory (what ``hf:path=`` loads); returns ``path``."""
    model.save_pretrained(path)
    word_tokenizer([f"w{i}" for i in range(int(model.config.vocab_size))]).save_pretrained(path)
    return path
