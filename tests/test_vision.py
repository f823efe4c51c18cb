"""The image encoder room: config, preprocessing, the SigLIP wrapper, checkpoint readers, and the
tiny SigLIP pretraining (smoke size)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import moshivis_lab  # noqa: F401  (makes transformers' SigLIP importable)
from moshivis_lab.vision import ImageEncoder, VisionConfig, count_parameters, preprocess
from moshivis_lab.vision.preprocess import to_rgb, unnormalise
from moshivis_lab.world.generate import load_scenes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(**kw) -> VisionConfig:
    """A 32 px, patch 8 (16 tokens), width 32, 2-layer tower: milliseconds per call."""
    base = dict(
        name="t", image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    return VisionConfig(**{**base, **kw})


def random_encoder(cfg: VisionConfig | None = None, seed: int = 0) -> ImageEncoder:
    torch.manual_seed(seed)
    return ImageEncoder.from_config(cfg or tiny_cfg())


def rgb_image(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


# ------------------------------------------------------------------------------------ config


def test_real_config_numbers_on_meta():
    c = VisionConfig.siglip_gemma2_448()
    assert (c.image_size, c.patch_size, c.grid_side, c.num_tokens) == (448, 14, 32, 1024)
    assert (c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size) == (1152, 27, 16, 4304)
    assert (c.hidden_act, c.layer_norm_eps, c.use_head) == ("gelu_pytorch_tanh", 1e-6, False)
    assert c.image_mean == (0.5, 0.5, 0.5) and c.image_std == (0.5, 0.5, 0.5)
    assert c.resample == "bicubic"
    hf = c.to_hf()
    assert (hf.hidden_size, hf.num_hidden_layers, hf.vision_use_head) == (1152, 27, False)
    enc = ImageEncoder.from_config(c, device="meta")
    assert next(enc.model.parameters()).device.type == "meta"
    tokens = enc(torch.empty(2, 3, 448, 448, device="meta"))
    assert tuple(tokens.shape) == (2, 1024, 1152)
    # SigLIP-So400m's vision tower without its pooling head (PaliGemma drops it).
    assert enc.num_parameters() == count_parameters(c) == 413_327_088
    assert enc.token_grid_side() == 32


def test_real_config_matches_paligemma2_448s_vision_config():
    # the vision_config of google/paligemma2-3b-pt-448 (as kyutai-labs/moshivis also spells it)
    paligemma = {
        "hidden_size": 1152, "image_size": 448, "intermediate_size": 4304,
        "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
        "num_image_tokens": 1024, "patch_size": 14, "projection_dim": 2304,
        "torch_dtype": "bfloat16", "vision_use_head": False,
    }  # fmt: skip
    got = VisionConfig.from_hf(paligemma, name="siglip_gemma2_448")
    assert got == VisionConfig.siglip_gemma2_448()


def test_tiny_config_and_round_trip():
    c = VisionConfig.tiny()
    assert c.num_tokens == c.grid_side**2 and c.image_size % c.patch_size == 0
    assert VisionConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert VisionConfig.from_hf(c.to_hf(), name="tiny") == c


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"patch_size": 10}, "patch_size: must divide image_size 32"),
        ({"num_heads": 3}, "num_heads: must divide hidden_size 32"),
        ({"hidden_act": "gelu_wrong"}, "unknown activation 'gelu_wrong'"),
        ({"resample": "box"}, "resample: must be one of"),
        ({"image_std": (0.5, 0.0, 0.5)}, "image_std: must be > 0"),
        ({"image_mean": (0.5, 0.5)}, "image_mean: needs one value per channel"),
        ({"image_size": 0}, "image_size: must be > 0"),
    ],
)
def test_config_validation(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        tiny_cfg(**kw)


def test_config_from_dict_drops_unknown_keys_with_a_warning():
    with pytest.warns(UserWarning, match=r"dropped unknown VisionConfig field\(s\) \['colour'\]"):
        c = VisionConfig.from_dict({**tiny_cfg().to_dict(), "colour": 1})
    assert c == tiny_cfg()


# ------------------------------------------------------------------------------ preprocessing


def test_preprocess_is_square_bicubic_then_unit_range_then_mean_std():
    im = rgb_image(40, 30)
    pv = preprocess(im, 32)
    ref = np.asarray(im.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    ref = (ref - 0.5) / 0.5
    assert pv.shape == (1, 3, 32, 32) and pv.dtype == torch.float32
    np.testing.assert_allclose(pv[0].permute(1, 2, 0).numpy(), ref, atol=1e-6)
    bilinear = preprocess(im, tiny_cfg(resample="bilinear"))
    assert not torch.allclose(bilinear, pv)  # the filter really is bicubic
    # [0, 1] then (x - 0.5) / 0.5: white -> 1, black -> -1, grey 0.5 -> 0.
    white = np.full((10, 10, 3), 255, np.uint8)
    black = np.zeros((10, 10, 3), np.uint8)
    grey = np.full((10, 10, 3), 0.5, np.float32)
    out = preprocess([white, black, grey], 16)
    assert torch.allclose(out[0], torch.ones(3, 16, 16))
    assert torch.allclose(out[1], -torch.ones(3, 16, 16))
    assert torch.allclose(out[2], torch.zeros(3, 16, 16), atol=1e-6)


def test_preprocess_uses_the_configs_mean_and_std():
    c = tiny_cfg(image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.25, 2.0))
    out = preprocess(np.full((8, 8, 3), 255, np.uint8), c)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.8, 3.2, 0.35]))
    back = unnormalise(out, c)
    assert back.shape == (1, 32, 32, 3) and (back == 255).all()


def test_non_square_images_are_squashed_not_cropped():
    arr = np.zeros((20, 80, 3), np.uint8)
    arr[:, :40] = (255, 0, 0)  # left half red, right half blue
    arr[:, 40:] = (0, 0, 255)
    out = preprocess(arr, 16)[0]
    assert torch.allclose(out[:, :, :7], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1))
    assert torch.allclose(out[:, :, 9:], torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1))


def _pixel(image, background=(255, 255, 255)) -> tuple[float, float, float]:
    """The [0, 1] colour of pixel (0, 0) after to_rgb (PIL or float array)."""
    rgb = to_rgb(image, background)
    arr = np.asarray(rgb, dtype=np.float32)
    arr = arr / 255.0 if isinstance(rgb, Image.Image) else arr
    assert arr.ndim == 3 and arr.shape[-1] == 3
    return tuple(round(float(v), 3) for v in arr[0, 0])


def test_every_pil_mode_becomes_rgb():
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    assert _pixel(red) == (1.0, 0.0, 0.0)
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # transparent black: shows the background
    assert _pixel(clear) == (1.0, 1.0, 1.0)
    assert _pixel(clear, background=(0, 255, 0)) == (0.0, 1.0, 0.0)
    half = Image.new("RGBA", (4, 4), (255, 0, 0, 128))  # half-transparent red over white
    assert _pixel(half) == pytest.approx((1.0, 0.498, 0.498), abs=0.005)
    assert _pixel(Image.new("LA", (4, 4), (0, 0))) == (1.0, 1.0, 1.0)
    assert _pixel(Image.new("L", (4, 4), 51)) == (0.2, 0.2, 0.2)
    assert _pixel(Image.new("1", (4, 4), 1)) == (1.0, 1.0, 1.0)
    assert _pixel(red.convert("P")) == (1.0, 0.0, 0.0)
    pal = red.convert("P")
    pal.info["transparency"] = pal.getpixel((0, 0))
    assert _pixel(pal) == (1.0, 1.0, 1.0)
    assert _pixel(Image.new("CMYK", (4, 4), (0, 255, 255, 0))) == (1.0, 0.0, 0.0)
    assert _pixel(red.convert("YCbCr")) == pytest.approx((1.0, 0.0, 0.0), abs=0.01)
    assert _pixel(Image.fromarray(np.full((4, 4), 65535, np.uint16))) == (1.0, 1.0, 1.0)
    assert _pixel(Image.fromarray(np.full((4, 4), 51, np.int32))) == (0.2, 0.2, 0.2)
    assert _pixel(Image.fromarray(np.full((4, 4), 0.25, np.float32))) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match=r"mode 'I' .* must hold 0..255 or 0..65535, got 0..70000"):
        to_rgb(Image.fromarray(np.array([[0, 70000]], np.int32)))
    with pytest.raises(ValueError, match=r"mode 'F' image must hold values in \[0, 1\]"):
        to_rgb(Image.fromarray(np.full((2, 2), 3.0, np.float32)))


def test_every_array_kind_and_paths_and_lists(tmp_path):
    rng = np.random.default_rng(1)
    rgb8 = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    ref = preprocess(Image.fromarray(rgb8), 16)
    assert torch.equal(preprocess(rgb8, 16), ref)
    # float input in [0, 1]: the same picture, resized in float (PIL's 8-bit resize rounds and
    # clips between its two passes: a few 1/255 apart on this noise, normalised x2)
    for dt in (np.float16, np.float32, np.float64):
        got = preprocess((rgb8 / 255.0).astype(dt), 16)
        assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=0.05)
        assert (got - ref).abs().mean() < 0.005
    grey = rgb8[..., 0]
    g = preprocess(grey, 16)
    assert torch.equal(g, preprocess(grey[..., None], 16))
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    rgba = np.concatenate([rgb8, np.full((24, 20, 1), 255, np.uint8)], axis=-1)
    assert torch.equal(preprocess(rgba, 16), ref)  # opaque alpha changes nothing
    rgba[..., 3] = 0
    assert torch.equal(preprocess(rgba, 16), torch.ones(1, 3, 16, 16))
    frgba = rgba.astype(np.float32) / 255.0
    assert torch.allclose(preprocess(frgba, 16), torch.ones(1, 3, 16, 16))
    path = tmp_path / "im.png"
    Image.fromarray(rgb8).save(path)
    assert torch.equal(preprocess(path, 16), ref)
    assert torch.equal(preprocess(str(path), 16), ref)
    batch = preprocess([path, rgb8, Image.fromarray(rgb8), grey], 16)
    assert batch.shape == (4, 3, 16, 16) and torch.equal(batch[0], batch[2])
    assert torch.equal(preprocess((rgb8, rgb8), 16), torch.cat([ref, ref]))


@pytest.mark.parametrize(
    ("bad", "err", "msg"),
    [
        (
            np.zeros((3, 16, 16), np.uint8),
            ValueError,
            r"channels-first .* arr\.transpose\(1, 2, 0\)",
        ),
        (np.zeros((2, 8, 8, 3), np.uint8), ValueError, r"is a batch; .* list\(arr\)"),
        (np.zeros((8, 8, 2), np.uint8), ValueError, r"not an image; expected HxW"),
        (np.zeros((8,), np.uint8), ValueError, r"not an image"),
        (np.zeros((0, 8, 3), np.uint8), ValueError, r"is empty"),
        (np.full((4, 4, 3), 200.0), ValueError, r"\[0, 1\], got 200..200; .*divide by 255"),
        (np.full((4, 4, 3), -0.5), ValueError, r"got -0.5..-0.5; rescale it to \[0, 1\]"),
        (np.full((4, 4), np.nan, np.float32), ValueError, r"NaN or infinite"),
        (np.zeros((4, 4, 3), np.int64), ValueError, r"must be uint8 .* arr\.astype\(np\.uint8\)"),
        (np.zeros((4, 4), np.uint16), ValueError, r"arr / 65535\.0"),
        (np.zeros((4, 4), bool), ValueError, r"masks, not images"),
        (torch.zeros(3, 8, 8), TypeError, r"torch\.Tensor; pass a numpy HxWxC image"),
        (42, TypeError, r"cannot read an image from a int"),
        ([], ValueError, r"empty list of images"),
        ([[np.zeros((4, 4), np.uint8)]], TypeError, r"nested lists"),
        ([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.int8)], ValueError, r"^image 1 of 2: "),
    ],
)
def test_bad_inputs_say_what_to_do(bad, err, msg):
    with pytest.raises(err, match=msg):
        preprocess(bad, 16)


def test_bad_paths_and_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image file"):
        preprocess(tmp_path / "missing.png", 16)
    with pytest.raises(ValueError, match="is a directory"):
        preprocess(tmp_path, 16)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image PIL can read"):
        preprocess(tmp_path / "notes.png", 16)
    with pytest.raises(ValueError, match=r"background must be an \(R, G, B\)"):
        preprocess(np.zeros((4, 4, 3), np.uint8), 16, background=(300, 0, 0))
    with pytest.raises(TypeError, match="VisionConfig or a positive int"):
        preprocess(np.zeros((4, 4, 3), np.uint8), 0)


# ------------------------------------------------------------------------------------ encoder


def test_encoder_is_frozen_and_returns_tokens():
    enc = random_encoder()
    assert enc.frozen and not enc.training
    assert enc.num_parameters(trainable_only=True) == 0 < enc.num_parameters()
    assert all(not p.requires_grad for p in enc.parameters())
    parent = torch.nn.Sequential(enc).train()
    assert not enc.training and not parent[0].model.training  # frozen stays in eval
    tokens = enc.encode([rgb_image(), np.zeros((5, 7), np.uint8)])
    assert tokens.shape == (2, 16, 32) and not tokens.requires_grad
    assert torch.equal(tokens, enc(enc.preprocess([rgb_image(), np.zeros((5, 7), np.uint8)])))
    assert enc.token_grid_side() == 4 and enc.tokens_to_grid(tokens).shape == (2, 4, 4, 32)
    assert torch.equal(enc.tokens_to_grid(tokens)[:, 1, 2], tokens[:, 1 * 4 + 2])
    assert enc.token_box(6) == (16.0, 8.0, 24.0, 16.0)
    assert enc.token_box(6, width=64, height=128) == (32.0, 32.0, 48.0, 64.0)
    with pytest.raises(ValueError, match=r"token index must be in \[0, 16\)"):
        enc.token_box(16)
    with pytest.raises(ValueError, match=r"must be \[B, 3, 32, 32\].*encoder\.preprocess"):
        enc(torch.zeros(1, 3, 30, 30))
    enc.unfreeze().train()
    assert enc.training and enc.num_parameters(trainable_only=True) == enc.num_parameters()
    assert enc.encode(rgb_image()).requires_grad
    enc.freeze()
    assert not enc.training and not enc.encode(rgb_image()).requires_grad


def test_other_input_sizes_interpolate_the_position_embeddings_as_kyuteye():
    """kyuteye_pt feeds the 448 px tower 512 px images (transformers' interpolate_pos_encoding);
    ``input_size`` does the same: more tokens, the tower's own interpolation, boxes to match."""
    enc = random_encoder(tiny_cfg(input_size=44))  # 32 px tower read at 44 px: 5 x 5 tokens
    assert enc.config.interpolates and enc.token_grid_side() == 5 and enc.num_tokens == 25
    pixels = enc.preprocess(rgb_image())
    assert pixels.shape == (1, 3, 44, 44)
    with torch.no_grad():
        ours = enc(pixels)
        ref = enc.model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
        native = random_encoder(tiny_cfg())
        at_32 = native.preprocess(rgb_image())
        same = native.model(pixel_values=at_32, interpolate_pos_encoding=True).last_hidden_state
    assert ours.shape == (1, 25, 32) and torch.equal(ours, ref)
    assert torch.equal(native(at_32), same)  # at the native size interpolation is the identity
    # 44 px = 5 patches of 8 + 4 px the convolution drops: boxes follow the patches
    assert enc.token_box(6) == (8.0, 8.0, 16.0, 16.0)
    assert enc.token_box(24, width=88, height=44) == (64.0, 32.0, 80.0, 40.0)
    with pytest.raises(ValueError, match=r"must be \[B, 3, 44, 44\]"):
        enc(torch.zeros(1, 3, 32, 32))
    moshika = VisionConfig.moshika_vis()
    assert (moshika.image_size, moshika.pixels, moshika.num_tokens) == (448, 512, 1296)
    with pytest.raises(ValueError, match="input_size"):
        tiny_cfg(input_size=4)


def test_save_and_load_round_trip(tmp_path):
    enc = random_encoder()
    enc.save(tmp_path)
    back = ImageEncoder.load(tmp_path)
    assert back.config == enc.config and back.frozen
    x = enc.preprocess(rgb_image())
    assert torch.equal(back(x), enc(x))


# ------------------------------------------------------------------- released checkpoint layout


def _write_moshivis_checkpoint(path, enc: ImageEncoder, dtype=torch.float32, drop=(), extra=None):
    """A file in the released MoshiVis layout: the tower under ``image_prefix.enc.model.`` beside
    adapter and LM tensors, written here straight from transformers' own state dict."""
    state = {
        f"image_prefix.enc.model.{k}": v.to(dtype).contiguous()
        for k, v in enc.model.state_dict().items()
    }
    for k in drop:
        del state[f"image_prefix.enc.model.{k}"]
    state |= {
        "image_prefix.proj_xa.weight": torch.zeros(8, 32),
        "image_prefix.norm_xa.alpha": torch.ones(1, 1, 8),
        "llm.transformer.layers.0.cross_attention.mha.in_proj_weight": torch.zeros(24, 8),
        **(extra or {}),
    }
    save_file(state, str(path))
    return path


def test_moshivis_checkpoint_reader_round_trip(tmp_path):
    src = random_encoder(seed=1)
    path = _write_moshivis_checkpoint(tmp_path / "model.safetensors", src)
    names = set(load_file(path))
    # The released names: SigLIP vision-transformer names under the image prefix.
    assert "image_prefix.enc.model.embeddings.patch_embedding.weight" in names
    assert "image_prefix.enc.model.encoder.layers.1.self_attn.q_proj.weight" in names
    assert "image_prefix.enc.model.post_layernorm.bias" in names
    enc = ImageEncoder.from_moshivis_checkpoint(path, tiny_cfg())
    x = src.preprocess([rgb_image(seed=3), rgb_image(seed=4)])
    assert enc.frozen and torch.equal(enc(x), src(x))
    assert set(enc.moshivis_state_dict()) == {n for n in names if ".enc.model." in n}
    other = random_encoder(seed=2).load_moshivis_weights(path)
    assert torch.equal(other(x), src(x))
    bf16 = _write_moshivis_checkpoint(tmp_path / "bf16.safetensors", src, dtype=torch.bfloat16)
    low = ImageEncoder.from_moshivis_checkpoint(bf16, tiny_cfg())
    assert next(low.model.parameters()).dtype == torch.float32
    assert torch.allclose(low(x), src(x), atol=0.1)


def test_moshivis_checkpoint_errors_list_names_and_load_nothing(tmp_path):
    src = random_encoder(seed=1)
    target = random_encoder(seed=2)
    before = {k: v.clone() for k, v in target.model.state_dict().items()}

    def untouched() -> bool:
        return all(torch.equal(before[k], v) for k, v in target.model.state_dict().items())

    missing = _write_moshivis_checkpoint(
        tmp_path / "missing.safetensors",
        src,
        drop=("encoder.layers.1.mlp.fc2.weight", "post_layernorm.weight"),
        extra={"image_prefix.enc.model.head.probe": torch.zeros(1, 1, 32)},
    )
    with pytest.raises(ValueError) as e:
        target.load_moshivis_weights(missing)
    msg = str(e.value)
    assert "2 missing: encoder.layers.1.mlp.fc2.weight, post_layernorm.weight" in msg
    assert "1 unexpected: head.probe" in msg and "Nothing was loaded" in msg
    assert untouched()
    with pytest.raises(ValueError, match="2 missing"):
        ImageEncoder.from_moshivis_checkpoint(missing, tiny_cfg())

    wider = _write_moshivis_checkpoint(
        tmp_path / "wider.safetensors", random_encoder(tiny_cfg(intermediate_size=48))
    )
    with pytest.raises(ValueError, match=r"mis-shaped: encoder\.layers\.0\.mlp\.fc1\.bias \[48\]"):
        target.load_moshivis_weights(wider)
    assert untouched()

    save_file({"llm.text_emb.weight": torch.zeros(4, 4)}, str(tmp_path / "lm.safetensors"))
    with pytest.raises(
        ValueError, match=r"no tensor name starts with 'image_prefix\.enc\.model\.'"
    ):
        target.load_moshivis_weights(tmp_path / "lm.safetensors")
    torch.save({}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="pickle checkpoints are refused"):
        target.load_moshivis_weights(tmp_path / "model.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint file here"):
        target.load_moshivis_weights(tmp_path / "absent.safetensors")
    assert untouched()


def test_hf_directory_readers(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    c = tiny_cfg()
    torch.manual_seed(0)
    text = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=1,
                eos_token_id=2, pad_token_id=3)  # fmt: skip
    dual = SiglipModel(
        SiglipConfig(text_config=text, vision_config=c.replace(use_head=True).to_hf().to_dict())
    )
    x = preprocess(rgb_image(), c)
    want = dual.vision_model(pixel_values=x).last_hidden_state
    dual.save_pretrained(tmp_path / "siglip")
    enc = ImageEncoder.from_pretrained(tmp_path / "siglip")
    assert enc.config.use_head is False and enc.frozen
    assert torch.allclose(enc(x), want, atol=1e-6)

    tower = random_encoder(seed=5)
    tower.model.save_pretrained(tmp_path / "tower")
    assert torch.equal(ImageEncoder.from_pretrained(tmp_path / "tower")(x), tower(x))

    # PaliGemma: the tower sits under vision_tower.vision_model. beside the language model.
    pg = tmp_path / "paligemma"
    pg.mkdir()
    vc = c.to_hf().to_dict()
    (pg / "config.json").write_text(json.dumps({"model_type": "paligemma", "vision_config": vc}))
    (pg / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3})
    )
    state = {f"vision_tower.vision_model.{k}": v for k, v in tower.model.state_dict().items()}
    state["language_model.model.embed_tokens.weight"] = torch.zeros(4, 4)
    save_file(state, str(pg / "model-00001-of-00001.safetensors"))
    assert torch.equal(ImageEncoder.from_pretrained(pg)(x), tower(x))

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ValueError, match="'clip' is not a SigLIP vision tower"):
        ImageEncoder.from_pretrained(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ImageEncoder.from_pretrained(tmp_path / "nothing")


# ------------------------------------------------------------------------- tiny SigLIP training


def test_retrieval_scores_and_chance():
    from moshivis_lab.vision.pretrain import retrieval_scores

    sim = torch.eye(10)
    r = retrieval_scores(sim, [{i} for i in range(10)])
    assert r["top1"] == r["top5"] == 1.0
    assert r["chance_top1"] == pytest.approx(0.1) and r["chance_top5"] == pytest.approx(0.5)
    flipped = retrieval_scores(-sim, [{i} for i in range(10)])
    assert flipped["top1"] == 0.0 and flipped["top5"] == 0.0
    two = retrieval_scores(torch.zeros(1, 4), [{0, 1}], ks=(1, 2))
    assert two["chance_top1"] == pytest.approx(0.5)
    assert two["chance_top2"] == pytest.approx(1 - math.comb(2, 2) / math.comb(4, 2))


def test_pretrain_vision_smoke(smoke_world, tmp_path):
    from moshivis_lab.vision.pretrain import (
        VisionPretrainConfig,
        batch_for_step,
        labels_for,
        load_pairs,
        load_pixels,
        load_vision_encoder,
        pretrain_vision,
        smoke_vision_config,
        vision_dir,
    )

    cfg, vc = smoke_world, smoke_vision_config()
    tcfg = VisionPretrainConfig.smoke()
    with pytest.raises(FileNotFoundError, match="moshivis-lab pretrain-vision --preset smoke"):
        load_vision_encoder(cfg, out_dir=tmp_path / "none")
    assert vision_dir(cfg) == cfg.data_dir / "smoke" / "vision"

    pairs = load_pairs(cfg, "train")
    idx, texts = batch_for_step(pairs, tcfg, 3)
    idx2, texts2 = batch_for_step(pairs, tcfg, 3)
    assert np.array_equal(idx, idx2) and texts == texts2 and len(set(idx.tolist())) == len(idx)
    labels = labels_for(pairs, idx, texts)
    assert torch.equal(labels.diagonal(), torch.ones(len(idx)))  # each text is true of its image
    # the trainer's cached pixels are exactly preprocess()'s
    px = load_pixels(pairs.image_paths[:2], vc)
    from moshivis_lab.vision.preprocess import normalise

    assert torch.equal(
        normalise(px, vc.image_mean, vc.image_std), preprocess(pairs.image_paths[:2], vc)
    )

    out = tmp_path / "vision"
    report = pretrain_vision(cfg, tcfg, vc, out_dir=out, progress=False)
    assert report["finished"] and report["step"] == tcfg.steps
    assert report["train_loss_last20"] < 0.8 * report["train_loss_first10"]
    train = report["retrieval"]["train_subset"]["caption"]
    assert train["top1"] > 2 * train["chance_top1"] and train["top5"] > train["chance_top5"]
    held = [report["retrieval"][s]["caption"] for s in ("val", "heldout")]
    for r in held:
        assert r["n_images"] >= 2 and 0 < r["chance_top1"] < 1 and 0.0 <= r["top1"] <= 1.0
    # unseen images (val + heldout pooled; a dozen at smoke size): above chance already
    hits = sum(r["top1"] * r["n_images"] for r in held)
    assert hits > sum(r["chance_top1"] * r["n_images"] for r in held)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "train"][-1] == tcfg.steps
    assert json.loads((out / "report.json").read_text())["step"] == tcfg.steps
    assert (out / "siglip" / "config.json").exists() and (
        out / ".pretrain_vision.done.json"
    ).exists()

    enc = load_vision_encoder(cfg, out_dir=out)
    assert enc.frozen and enc.config.use_head is False
    tokens = enc.encode(pairs.image_paths[0])
    assert tokens.shape == (1, vc.num_tokens, vc.hidden_size)
    again = pretrain_vision(cfg, tcfg, vc, out_dir=out, progress=False)  # stamped: skipped
    assert again == json.loads((out / "report.json").read_text())
    with pytest.raises(ValueError, match="other settings .* overwrite=True"):
        pretrain_vision(cfg, tcfg.replace(seed=1), vc, out_dir=out, progress=False)


def test_region_texts_and_batches(smoke_world, monkeypatch, tmp_path):
    from moshivis_lab.vision import pretrain as vp
    from moshivis_lab.vision.probe import cell_index

    pairs = vp.load_pairs(smoke_world, "train")
    sc = next(s for s in load_scenes(smoke_world)["train"] if s.objects)
    o = sc.objects[0]
    texts = vp.region_texts(o)
    assert len(texts) == len(vp.REGION_KINDS) and texts[0].endswith(f" {o.shape}.")
    assert texts[-1] == f"{texts[-1].split()[0]} {o.size} {o.colour} {o.shape}."
    regs = vp.scene_regions(sc)
    assert [r.cells for r in regs[: len(sc.objects)]] == [(tuple(x.cell),) for x in sc.objects]

    tcfg = vp.VisionPretrainConfig.smoke()
    side = 8
    idx, _ = vp.batch_for_step(pairs, tcfg, 2)
    pool, rtexts, labels = vp.region_batch(pairs, idx, tcfg, 2, side)
    regions = [(b, r) for b, i in enumerate(idx) for r in pairs.regions[int(i)]]
    assert pool.shape == (len(regions), len(idx) * side * side) and labels.shape == (
        len(rtexts),
        len(regions),
    )
    assert torch.allclose(pool.sum(1), torch.ones(len(regions)))
    cells = cell_index(side)
    for row, (b, reg) in zip(pool, regions, strict=True):
        block = row.reshape(len(idx), side * side)
        assert block[np.arange(len(idx)) != b].abs().sum() == 0  # only its own image's tokens
        want = np.isin(cells, [r * 3 + c for r, c in reg.cells])
        assert np.array_equal(block[b].numpy() > 0, want)  # exactly the tokens of its cells
    assert (labels.sum(0) >= 1).all()  # every region's picked text is among the texts
    for t, lab in zip(rtexts, labels, strict=True):  # "A star." is true of every star
        assert lab.tolist() == [float(t in reg.texts) for _, reg in regions]
    again = vp.region_batch(pairs, idx, tcfg, 2, side)
    assert torch.equal(pool, again[0]) and rtexts == again[1]
    # the shape-only kind alone: every text names a shape or a word, nothing else
    only = tcfg.replace(region_mix=(1.0, 0.0, 0.0, 0.0))
    _, t1, _ = vp.region_batch(pairs, idx, only, 2, side)
    assert all(len(t.split()) == 2 or t.startswith("The word") for t in t1)
    with pytest.raises(ValueError, match="region_mix"):
        vp.VisionPretrainConfig(region_mix=(0.5, 0.5))
    with pytest.raises(ValueError, match="region_weight"):
        vp.VisionPretrainConfig(region_weight=-1.0)
    # a world without scene graphs, or a grid too coarse for the cells: told what to do
    tiny_vc = VisionConfig(name="c", image_size=16, patch_size=8, hidden_size=32, num_layers=1,
                           num_heads=2, intermediate_size=64)  # fmt: skip
    with pytest.raises(ValueError, match="2 x 2 token grid .* region_weight=0"):
        vp.pretrain_vision(smoke_world, tcfg, tiny_vc, out_dir=tmp_path / "g", progress=False)
    monkeypatch.setattr(vp, "_scene_index", lambda cfg, split: {})
    with pytest.raises(ValueError, match="scene graphs.*region_weight=0"):
        vp.pretrain_vision(smoke_world, tcfg, VisionConfig(name="x", image_size=32, patch_size=8,
                           hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                           out_dir=tmp_path / "s", progress=False)  # fmt: skip


def test_pretrain_vision_resume_equals_straight_run(smoke_world, tmp_path):
    from moshivis_lab.vision.pretrain import VisionPretrainConfig, pretrain_vision

    vc = VisionConfig(name="r", image_size=32, patch_size=8, hidden_size=32, num_layers=1,
                      num_heads=2, intermediate_size=64)  # fmt: skip
    tcfg = VisionPretrainConfig.smoke().replace(
        steps=4, batch_size=8, warmup_steps=1, eval_interval=4, ckpt_interval=2, text_hidden=32,
        text_intermediate=64, text_layers=1,
    )  # fmt: skip
    straight = pretrain_vision(smoke_world, tcfg, vc, out_dir=tmp_path / "a", progress=False)
    part = pretrain_vision(
        smoke_world, tcfg, vc, out_dir=tmp_path / "b", progress=False, max_new_steps=3
    )
    assert not part["finished"] and part["step"] == 3
    resumed = pretrain_vision(smoke_world, tcfg, vc, out_dir=tmp_path / "b", progress=False)
    assert resumed["finished"] and resumed["retrieval"] == straight["retrieval"]
    a = load_file(tmp_path / "a" / "vision_tower.safetensors")
    b = load_file(tmp_path / "b" / "vision_tower.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_has_the_pretrain_vision_command():
    from typer.testing import CliRunner

    from moshivis_lab.cli import app

    res = CliRunner().invoke(app, ["pretrain-vision", "--help"])
    assert res.exit_code == 0, res.output
    for opt in ("--preset", "--data-dir", "--steps", "--minutes", "--threads", "--overwrite"):
        assert opt in res.output


# ------------------------------------------------------------------ linear probes of the tokens


def test_cell_index_assigns_tokens_to_the_worlds_cells():
    from moshivis_lab.vision.probe import cell_features, cell_index

    nine = cell_index(9).reshape(9, 9)
    assert (nine[:3, :3] == 0).all() and (nine[3:6, 6:] == 5).all() and (nine[6:, 6:] == 8).all()
    eight = cell_index(8)  # the smoke grid: every cell gets tokens, assigned by their centres
    assert sorted(set(eight.tolist())) == list(range(9))
    tokens = torch.arange(2 * 81 * 1, dtype=torch.float32).reshape(2, 81, 1)
    f = cell_features(tokens)
    assert f.shape == (2, 9, 1)
    assert f[0, 0, 0] == pytest.approx(np.mean([0, 1, 2, 9, 10, 11, 18, 19, 20]))
    with pytest.raises(ValueError, match="too coarse"):
        cell_features(torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="square grid"):
        cell_features(torch.zeros(1, 80, 3))


def test_attribute_probes_find_what_the_tokens_encode_and_not_what_they_do_not():
    from types import SimpleNamespace

    from moshivis_lab.vision.probe import attribute_probes

    rng = np.random.default_rng(0)
    colours, shapes = ["red", "green", "blue", "pink"], ["circle", "star", "cross", "heart"]
    scenes, tokens = [], np.zeros((400, 81, 8), np.float32)
    for n in range(400):
        objs = []
        for cell in [(int(rng.integers(3)), int(rng.integers(3)))]:
            c, s = int(rng.integers(4)), int(rng.integers(4))
            objs.append(
                SimpleNamespace(cell=cell, colour=colours[c], shape=shapes[s], size="small")
            )
            grid = tokens[n].reshape(9, 9, 8)
            grid[3 * cell[0] : 3 * cell[0] + 3, 3 * cell[1] : 3 * cell[1] + 3, c] = 1.0
        tokens[n] += 0.05 * rng.standard_normal(tokens[n].shape).astype(np.float32)
        scenes.append(SimpleNamespace(objects=objs, word=None, word_cells=None))
    rep = attribute_probes(tokens, scenes)
    assert rep["colour"]["accuracy"] > 0.95 and rep["colour"]["n_test"] == 80
    assert rep["shape"]["accuracy"] < 0.5  # chance is 0.25: the tokens say nothing of shape
    assert rep["size"]["accuracy"] is None and rep["word"]["accuracy"] is None  # one class / none
    with pytest.raises(ValueError, match="token rows"):
        attribute_probes(tokens[:10], scenes)


def test_probe_encoder_on_the_smoke_encoder(smoke_pretrained, tmp_path):
    from moshivis_lab.artefacts import read_json
    from moshivis_lab.vision.probe import probe_encoder

    cfg = smoke_pretrained
    out = tmp_path / "probes.json"
    rep = probe_encoder(cfg, out_path=out, cache=False, progress=False)  # the world: read only
    assert read_json(out) == rep
    assert set(rep["probes"]) == {"colour", "shape", "size", "word"}
    col = rep["probes"]["colour"]
    assert col["n_train"] > 0 and col["n_test"] > 0 and 0.0 <= col["accuracy"] <= 1.0
