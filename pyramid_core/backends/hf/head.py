"""Feature-level draft heads (EAGLE, arXiv 2401.15077; EAGLE-3, arXiv 2503.01840): a small
network that reads a verifier's hidden states and predicts the next token.

Slots. For a context x_0 .. x_{L-1} the head runs one *slot* per position j = 0 .. L-1: slot j
reads ``u_{j-1}`` -- the feature of position j-1 (the hidden state after consuming x_{j-1};
zeros for j = 0) -- and the embedding of x_j::

    a_j   = fc([u_{j-1} ; embed(x_j)])                       (2H -> H)
    h^_j  = decoder layer(s)(a_0 .. a_j)                     (causal, own KV cache)
    q_j   = softmax(LM head([norm](h^_j)))                   next-token distribution after x_j

so the row after the context is slot L-1's. ``h^_j`` is the head's own prediction of the
feature of position j: where the source has not scored position j (a drafted token), ``h^_j``
stands in for ``u_j`` in slot j+1 (``hf.feature_stage``).

Variants:
- ``eagle1``: ``u`` is the source's final-normed state (layer ``-1``), ``h^`` is trained to
  regress onto it (smooth-L1) and goes to the LM head as it is;
- ``eagle3``: ``u = fuse([f^(l1) ; f^(l2) ; ...])`` fuses several layers (e.g. a low, a middle
  and a high one) to H; ``h^`` lives in that fused space, goes through a norm to the head, and is
  trained on the tokens only, over its own unrolled predictions ("training-time test"). Its first
  decoder layer is EAGLE-3's own (the layout of the paper's code, of SpecForge and of the
  ``speculators`` checkpoints vLLM serves) instead of ``fc``: the attention reads
  ``[norm_e(embed(x_j)) ; norm_h(u_{j-1})]`` (2H wide: its q, k, v projections take 2H) and the
  residual stream starts from ``u_{j-1}`` (or from ``norm_h(u_{j-1})`` with
  ``norm_before_residual``); later layers are plain decoder layers. So an eagle3 head converts to
  and from that format exactly (``hf.speculators``).

The LM head is the source model's own (shared, frozen) or a frequency-ranked sub-vocabulary head of
the draft's own (``hf.student.SubVocabHead``): with SmolLM2's 49152 x 576 head the draft's cost is
dominated by the head, so K rows (K << vocab) make it several times cheaper (measured: [the feature
draft](../../distill.md#the-feature-draft)).

A trained head is a folder: ``stage.json`` (format ``pyramid-feature-stage/1``, the base model,
the architecture, training metadata) and ``model.safetensors`` (only what was trained, fp16);
the embedding, rotary tables and a shared head come from the base model at load time.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from pyramid_core.backends.hf.files import check_safetensors, fix_for, read_json
from pyramid_core.backends.hf.hub import resolve_model_dir
from pyramid_core.backends.hf.layers import decoder_layers
from pyramid_core.backends.hf.loading import check_weights
from pyramid_core.backends.hf.smollm2 import smollm2_dir, smollm2_ready
from pyramid_core.backends.hf.student import STAGE_FILE, WEIGHTS_FILE, SubVocabHead, weights_record
from pyramid_core.errors import ConfigError

__all__ = ["FeatureHeadConfig", "FeatureHead", "VARIANTS", "FORMAT", "LAYER_KEYS", "is_feature_dir", "feature_base", "resolve_base",
           "save_feature_head", "load_feature_head", "unrolled_mask"]

FORMAT = "pyramid-feature-stage/1"
VARIANTS = ("eagle1", "eagle3")
LAYER_KEYS = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "attention_bias",
              "mlp_bias", "hidden_act", "rms_norm_eps")
"""What a head's decoder layers may take from their own config rather than the base model's."""


def _layers(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    return tuple(int(v) for v in value)


@attrs.frozen
class FeatureHeadConfig:
    """The architecture of a feature head.

    layers:    source layers it reads (``hf.features`` numbering): ``(-1,)`` for EAGLE-1
    variant:   ``eagle1`` or ``eagle3`` (module docstring)
    depth:     decoder layers in the head
    sub_vocab: rows of its own sub-vocabulary head; 0 = the source's LM head (shared)
    norm_before_residual: eagle3 only -- the residual stream starts from the normed feature
               (some published EAGLE-3 heads) instead of the feature itself
    """

    layers: tuple[int, ...] = attrs.field(default=(-1,), converter=_layers)
    variant: str = "eagle1"
    depth: int = 1
    sub_vocab: int = 0
    norm_before_residual: bool = False

    def __attrs_post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"feature head: unknown variant {self.variant!r}; valid: {', '.join(VARIANTS)}")
        if not self.layers:
            raise ValueError("feature head: give at least one source layer (e.g. -1)")
        if self.variant == "eagle1" and self.layers != (-1,):
            raise ValueError(f"feature head: eagle1 reads the final-normed state only (layers=-1), got {list(self.layers)}; "
                             "fuse several layers with variant=eagle3")
        if self.depth < 1:
            raise ValueError(f"feature head: depth must be >= 1 decoder layer, got {self.depth}")
        if self.sub_vocab < 0:
            raise ValueError(f"feature head: sub_vocab must be >= 0 (0 = the source's head), got {self.sub_vocab}")
        if self.norm_before_residual and self.variant != "eagle3":
            raise ValueError("feature head: norm_before_residual belongs to EAGLE-3's first layer (variant=eagle3)")

    @property
    def regresses(self) -> bool:
        """Whether h^ is trained towards the source's feature (EAGLE-1)."""
        return self.variant == "eagle1"


def unrolled_mask(slots: int, passes: int, device: torch.device | str = "cpu") -> Tensor:
    """``Bool[Tensor, "slots passes*slots"]``: the attention of unrolled pass ``passes`` (1-based)
    over the keys of passes 1 .. ``passes`` (pass i's keys at columns (i-1)*slots ..).

    In pass k, slot j stands for a draft that reached slot j over k-1 drafted positions: it
    sees pass 1 (the source's real features) up to slot j-k+1, then the one key of each later
    pass i on its own path, slot j-k+i. Pass 1 is plain causal attention."""
    s = torch.arange(slots, device=device)
    cols = torch.arange(passes * slots, device=device)
    which, slot = cols // slots + 1, cols % slots
    q = s.unsqueeze(1)
    first = (which == 1) & (slot <= q - passes + 1)
    later = (which > 1) & (slot == q - passes + which)
    mask: Tensor = first | later
    return mask


class FeatureHead(nn.Module):
    """The trainable part of a feature draft (module docstring). Built on ``base`` (the source
    model, an ``AutoModelForCausalLM``), whose embedding and, without a sub-vocabulary, LM head
    it shares (kept outside its parameters: never trained, never saved)."""

    embed: nn.Module
    base_head: nn.Module
    base: Any

    def __init__(self, base: Any, cfg: FeatureHeadConfig, sub_vocab_ids: Tensor | None = None,
                 layer_config: dict[str, Any] | None = None) -> None:
        """``layer_config``: attributes of the head's decoder layers that differ from the base
        model's (an imported head's ``intermediate_size``, say; ``LAYER_KEYS``)."""
        super().__init__()
        self.cfg = cfg
        config = copy.deepcopy(base.config)
        config.num_hidden_layers = cfg.depth
        self.layer_config = dict(layer_config or {})
        unknown = sorted(set(self.layer_config) - set(LAYER_KEYS))
        if unknown:
            raise ValueError(f"feature head: a head's layers may differ from the base model's only in "
                             f"{', '.join(LAYER_KEYS)}; got {', '.join(unknown)}")
        for key, value in self.layer_config.items():
            setattr(config, key, value)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[: cfg.depth]
        config._attn_implementation = "sdpa"
        self.config = config
        hidden = int(config.hidden_size)
        self.hidden = hidden
        self.feature_width = len(cfg.layers) * hidden
        dtype = base.get_input_embeddings().weight.dtype
        eagle3 = cfg.variant == "eagle3"
        self.fuse = nn.Linear(self.feature_width, hidden, bias=False) if eagle3 else None
        self.fc = None if eagle3 else nn.Linear(2 * hidden, hidden, bias=True)
        layer_cls = type(decoder_layers(base)[2][0])
        self.layers = nn.ModuleList([layer_cls(config, i) for i in range(cfg.depth)])
        self.hidden_norm: nn.Module | None = None
        if eagle3:  # EAGLE-3's first layer: q, k, v read [norm_e(embedding) ; norm_h(u)], 2H wide
            first: Any = self.layers[0]
            attn = first.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                old = getattr(attn, name)
                setattr(attn, name, nn.Linear(2 * hidden, old.out_features, bias=old.bias is not None))
            self.hidden_norm = copy.deepcopy(first.input_layernorm)
        # the cache keyword of a decoder layer: ``cache`` (transformers 5) or ``past_key_values`` (4.x)
        params = inspect.signature(layer_cls.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.norm = copy.deepcopy(base.model.norm) if cfg.variant == "eagle3" else None
        self.rotary = type(base.model.rotary_emb)(config=config)
        self.own_head: SubVocabHead | None = None
        vocab = int(base.get_input_embeddings().weight.shape[0])
        self.vocab_size = vocab
        if cfg.sub_vocab:
            if sub_vocab_ids is None or sub_vocab_ids.numel() != cfg.sub_vocab:
                raise ValueError(f"feature head: sub_vocab={cfg.sub_vocab} needs that many token ids")
            head_weight = base.get_output_embeddings().weight.detach()
            self.own_head = SubVocabHead(head_weight[sub_vocab_ids.to(head_weight.device)], sub_vocab_ids, vocab)
        self._init_weights(float(getattr(config, "initializer_range", 0.02)))
        self.to(device=base.get_input_embeddings().weight.device, dtype=dtype)
        # shared with the base model, outside the module tree (not parameters of the head)
        object.__setattr__(self, "embed", base.get_input_embeddings())
        object.__setattr__(self, "base_head", base.get_output_embeddings())
        object.__setattr__(self, "base", base)

    def _init_weights(self, std: float) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("own_head"):
                    continue
                if p.dim() >= 2:
                    p.normal_(0.0, std)
                elif name.endswith("bias"):
                    p.zero_()

    def head_module(self) -> nn.Module:
        """The LM head the logits come from: its own sub-vocabulary head or the base model's."""
        head: nn.Module = self.own_head if self.own_head is not None else self.base_head
        return head

    def fuse_features(self, features: Tensor) -> Tensor:
        """``Float[Tensor, "... width"]`` source features -> ``Float[Tensor, "... H"]`` slot inputs u."""
        return features if self.fuse is None else self.fuse(features)

    def slots(self, u_prev: Tensor, tokens: Tensor, positions: Tensor, *, mask: Tensor | None = None,
              cache: Any = None) -> Tensor:
        """h^ for slots reading ``u_prev`` (``Float[Tensor, "b s H"]``, the fused feature of the
        position before each slot) and ``tokens`` (``Long[Tensor, "b s"]``) at ``positions``;
        ``mask`` (``Bool[Tensor, "b|1 1 s keys"]``, True = attend) over the cached keys then
        these; ``None``: causal without a cache, or a single slot."""
        e = self.embed(tokens).to(u_prev.dtype)
        pe = self.rotary(u_prev, positions)
        layers = iter(self.layers)
        if self.fc is not None:
            x: Tensor = self.fc(torch.cat([u_prev, e], dim=-1))
        else:  # EAGLE-3's first layer (module docstring)
            first: Any = next(layers)
            normed = self.hidden_norm(u_prev) if self.hidden_norm is not None else u_prev
            x = normed if self.cfg.norm_before_residual else u_prev
            attn = first.self_attn(hidden_states=torch.cat([first.input_layernorm(e), normed], dim=-1),
                                   attention_mask=mask, position_ids=positions, use_cache=cache is not None,
                                   position_embeddings=pe, **{self._cache_kw: cache})
            x = x + attn[0]
            x = x + first.mlp(first.post_attention_layernorm(x))
        for layer in layers:
            x = layer(x, attention_mask=mask, position_ids=positions, use_cache=cache is not None,
                      position_embeddings=pe, **{self._cache_kw: cache})
            if isinstance(x, tuple):  # transformers 4.x layers return (hidden, ...)
                x = x[0]
        return x

    def logits(self, h: Tensor, head: nn.Module | None = None) -> Tensor:
        """Full-vocabulary logits from predicted features (``head`` overrides the LM head, e.g. a
        pre-packed one)."""
        if self.norm is not None:
            h = self.norm(h)
        out: Tensor = (head or self.head_module())(h)
        return out

    @property
    def reference_weight(self) -> Tensor:
        """A weight of the head: its device and dtype are the head's."""
        layer: Any = self.layers[0]
        w: Tensor = layer.mlp.down_proj.weight
        return w

    def trainable_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("rotary.")}


def is_feature_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a trained feature head (``stage.json`` of format ``FORMAT``)."""
    file = Path(path).expanduser() / STAGE_FILE
    if not file.is_file():
        return False
    try:
        return bool(json.loads(file.read_text()).get("format") == FORMAT)
    except (OSError, ValueError):
        return False


def feature_base(path: str | Path) -> Path:
    """The directory of the model a feature head was trained on (its embedding, tokenizer)."""
    path = Path(path).expanduser().resolve()
    return resolve_base(str(read_json(path / STAGE_FILE)["base"]), path)


def resolve_base(base: str, head_dir: Path) -> Path:
    """The directory of a head's base model as its folder records it: ``smollm2`` (the set-up
    SmolLM2-135M), a directory (relative to the head's folder) or a Hugging Face id."""
    if base == "smollm2":
        if not smollm2_ready():
            raise ValueError(f"the feature head {head_dir} is built on SmolLM2-135M, which is not set up; run `pyramid setup` first")
        return smollm2_dir()
    where = Path(base).expanduser()
    if not where.is_absolute():
        where = (head_dir / where).resolve()
    if where.is_dir() or "/" not in base or base.startswith((".", "/", "~")):
        return where
    return resolve_model_dir(base)


def save_feature_head(head: FeatureHead, out_dir: str | Path, *, base: str, metadata: dict[str, Any] | None = None,
                      dtype: torch.dtype = torch.float16) -> Path:
    """Write ``model.safetensors`` (floating tensors in ``dtype``) and ``stage.json``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in head.trainable_state().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    info = {
        "format": FORMAT,
        "base": base,
        "architecture": attrs.asdict(head.cfg),
        "dtype": str(dtype).removeprefix("torch."),
        "parameters_shipped": int(sum(v.numel() for k, v in state.items() if v.is_floating_point())),
    } | (metadata or {}) | {"weights": weights_record(out / WEIGHTS_FILE)}
    (out / STAGE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def load_feature_head(path: str | Path, base: Any) -> FeatureHead:
    """The head in ``path`` on the base model ``base`` (loaded by the caller, e.g. with
    ``hf.loading.load_model(feature_base(path))``), in the base model's dtype, eval mode."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    info = read_json(path / STAGE_FILE)
    if info.get("format") != FORMAT:
        raise ValueError(f"{path / STAGE_FILE}: not a feature head (format {info.get('format')!r}, expected {FORMAT})")
    cfg = FeatureHeadConfig(**info["architecture"])
    check_safetensors(path / WEIGHTS_FILE)
    state = load_file(str(path / WEIGHTS_FILE))
    ids = state.get("own_head.token_ids")
    held = 0 if ids is None else int(ids.numel())
    if cfg.sub_vocab != held:
        raise ConfigError(f"{path / STAGE_FILE} says sub_vocab={cfg.sub_vocab} but {path / WEIGHTS_FILE} holds "
                          + ("no sub-vocabulary head" if not held else f"a {held}-token sub-vocabulary head")
                          + f"; {fix_for(path / STAGE_FILE)}")
    head = FeatureHead(base, cfg, state.get("own_head.token_ids"))
    expected = set(head.trainable_state())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{path / WEIGHTS_FILE} does not match stage.json: missing {missing[:4]}, unexpected {extra[:4]}")
    check_weights(path, info)
    dtype = base.get_input_embeddings().weight.dtype
    head.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    return head.eval()
