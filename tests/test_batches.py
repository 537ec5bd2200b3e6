"""Training batches (``pyramid_core.lab.distill.train._epoch_batches``): every sequence once per
epoch within the token bound, seeded, and with a sort window, batches of similar lengths (less
padding) in a random order; a feature run records its window, and a checkpoint of another window
is not resumed."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import torch

from pyramid_core.errors import ConfigError
from pyramid_core.lab.distill.train import _epoch_batches


def _lengths(n: int = 600, seed: int = 0) -> list[int]:
    return torch.randint(8, 360, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _real_per_padded(lengths: list[int], batches: list[list[int]]) -> float:
    return sum(lengths) / sum(max(lengths[i] for i in b) * len(b) for b in batches)


@pytest.mark.parametrize("window", [0, 1, 7, 64, 10_000])
def test_every_sequence_once_within_the_bound_and_seeded(window: int) -> None:
    lengths = _lengths()
    batches = _epoch_batches(lengths, 2048, seed=3, epoch=1, sort_window=window)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in b) * len(b) <= 2048 for b in batches)
    assert batches == _epoch_batches(lengths, 2048, seed=3, epoch=1, sort_window=window)
    assert batches != _epoch_batches(lengths, 2048, seed=3, epoch=2, sort_window=window)


def test_a_pool_with_repeats_keeps_them() -> None:
    lengths = _lengths(50)
    pool = list(range(50)) + list(range(10))
    batches = _epoch_batches(lengths, 1024, seed=0, epoch=0, pool=pool, sort_window=16)
    assert sorted(i for b in batches for i in b) == sorted(pool)


def test_a_sort_window_cuts_padding_and_keeps_the_order_random() -> None:
    lengths = _lengths(2000)
    plain = _epoch_batches(lengths, 4096, seed=0, epoch=0)
    sorted_ = _epoch_batches(lengths, 4096, seed=0, epoch=0, sort_window=256)
    assert _real_per_padded(lengths, plain) < 0.7 < 0.9 < _real_per_padded(lengths, sorted_)
    widths = [max(lengths[i] for i in b) for b in sorted_]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)  # batches are shuffled
    # a window spreads over the epoch: the first window's sequences are not all in the first steps
    first_window = set(torch.randperm(2000, generator=torch.Generator().manual_seed(0)).tolist()[:256])
    steps = sorted(k for k, b in enumerate(sorted_) if first_window & set(b))
    assert steps[-1] - steps[0] > len(sorted_) // 2


def test_a_feature_run_records_its_window_and_refuses_another_on_resume(tmp_path: Any) -> None:
    from pyramid_core.backends.hf.tiny import save_with_words, tiny_llama
    from pyramid_core.lab.distill.corpus import TeacherRows, TrainSequence
    from pyramid_core.lab.distill.heads import FeatureTrainConfig, train_feature_head

    model = tiny_llama(0, num_layers=2)
    base = save_with_words(model, tmp_path / "base")
    gen = torch.Generator().manual_seed(0)
    corpus = []
    for i in range(8):
        ids = torch.randint(0, 64, (1, 6 + 2 * i), generator=gen)
        with torch.inference_mode():
            values, top = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1].topk(8, dim=-1)
        corpus.append(TrainSequence("python", ids[0].tolist(), 0, TeacherRows(values.half(), top.to(torch.int32))))
    cfg = FeatureTrainConfig(sub_vocab=0, steps=2, batch_tokens=64, warmup=1, sort_window=4, save_every=1)
    report = train_feature_head(model, corpus, cfg, tmp_path / "head", base=str(base), autocast=False, progress=False)
    assert report["config"]["sort_window"] == 4
    other = attrs.evolve(cfg, sort_window=0)  # the same run but for its window
    with pytest.raises(ConfigError, match="another training configuration"):
        train_feature_head(model, corpus, other, tmp_path / "head", base=str(base), autocast=False, progress=False)
    with pytest.raises(ValueError, match="sort_window"):
        FeatureTrainConfig(sort_window=-1)
