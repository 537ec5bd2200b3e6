"""The feature channel of a pipeline: which stage reads the hidden states of which
([feature-level drafts](../../algorithms.md#feature-level-drafts)).

A ``FeatureReader`` at stage k reads from the stage it hands its blocks to (``"next"``, stage
k+1) or from the target (``"target"``). ``feature_links`` checks this once, when a pipeline is
built -- a source that is not a ``FeatureSource``, or lacks a layer the reader fuses, is a
``ConfigError`` naming both stages -- and ``FeatureLinks.connect`` runs before every generation:
each source keeps exactly the layers its readers need (none when no reader reads it, so a stage
shared by several pipelines pays for features only where they are read) and each reader is
attached to its source.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from pyramid_core.errors import ConfigError
from pyramid_core.protocols import FEATURE_FROM, FeatureReader, FeatureSource, WrapsStage

__all__ = ["FeatureLinks", "feature_links", "reader_of"]


def reader_of(stage: object) -> FeatureReader | None:
    """The ``FeatureReader`` a pipeline stage is, or wraps (a token tree around one), if any."""
    if isinstance(stage, FeatureReader):
        return stage
    if isinstance(stage, WrapsStage) and isinstance(stage.stage, FeatureReader):
        return stage.stage
    return None


@attrs.frozen(eq=False)
class FeatureLinks:
    """(reader, source) pairs of one pipeline, and every feature source in it."""

    links: tuple[tuple[FeatureReader, FeatureSource], ...]
    sources: tuple[FeatureSource, ...]

    def connect(self) -> None:
        """Enable on each source the union of the layers its readers fuse (``()`` for a source
        nobody reads), then attach every reader to its source."""
        for source in self.sources:
            layers: list[int] = []
            for reader, src in self.links:
                if src is source:
                    layers += [i for i in reader.feature_layers if i not in layers]
            source.enable_features(tuple(layers))
        for reader, source in self.links:
            reader.attach(source)


def feature_links(stages: Sequence[object], name: Callable[[object, int], str]) -> FeatureLinks:
    """Check and collect the feature links of a pipeline's ``stages`` (smallest first)."""
    links: list[tuple[FeatureReader, FeatureSource]] = []
    n = len(stages)
    for k, stage in enumerate(stages):
        reader = reader_of(stage)
        if reader is None:
            continue
        where = reader.feature_from
        if where not in FEATURE_FROM:
            raise ConfigError(f"{name(stage, k)} reads features from {where!r}; valid: {', '.join(FEATURE_FROM)}")
        if k == n - 1:
            raise ConfigError(f"{name(stage, k)} reads features from a stage above it, but it is the target")
        index = k + 1 if where == "next" else n - 1
        source = stages[index]
        if not isinstance(source, FeatureSource):
            raise ConfigError(
                f"{name(stage, k)} reads features from stage {index + 1} ({name(source, index)}, "
                f"features_from={where}), which cannot provide features (it is not a FeatureSource: a model "
                "stage that exposes its hidden states, e.g. an HFStage)")
        try:
            source.enable_features(tuple(reader.feature_layers))
        except ValueError as exc:
            raise ConfigError(f"{name(stage, k)} reads layers {list(reader.feature_layers)} of stage {index + 1} "
                              f"({name(source, index)}): {exc}") from None
        n_layers = len(reader.feature_layers)
        width = n_layers * source.feature_size
        if reader.feature_width != width:
            raise ConfigError(f"{name(stage, k)} expects features of width {reader.feature_width}, but stage {index + 1} "
                              f"({name(source, index)}) gives {width} ({n_layers} layer{'s' if n_layers != 1 else ''} "
                              f"x {source.feature_size})")
        links.append((reader, source))
    sources = tuple(s for s in stages if isinstance(s, FeatureSource))
    return FeatureLinks(tuple(links), sources)
