"""Bad inputs at every public entry point: each gets a correct result or a clear error.

Researchers feed the lab their own images, recordings, text, settings and checkpoints. For each
kind of input this file lists what people actually have at hand (RGBA / 16-bit / CMYK images,
truncated files, stereo 8-bit 44.1 kHz recordings, NaN samples, emoji, NaN learning rates, the
wrong checkpoint...) and checks that every entry point either converts it correctly (RGBA
composited over white, stereo averaged, audio resampled) or refuses it with a message that says
what is wrong and what to do. Never a silent wrong result, never an obscure crash, never a
half-written artefact.

The cases are module-level tuples (``*_CASES``, plus ``INLINE_CASES`` for the few checked inline);
``test_case_counts`` prints how many there are per class, with the hypothesis examples. Where a
module did the wrong thing when the suite was written (viz, image tokens, text replies, adapter
files), it was fixed there and the case stays here.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import struct
import types
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from moshivis_lab.audio.io import load_audio, prepare, resample, to_mono_float
from moshivis_lab.audio.tiny_codec import TinyCodec
from moshivis_lab.config import (
    PRESETS,
    CodecConfig,
    LabConfig,
    LMConfig,
    MoshiVisConfig,
    TokenizerConfig,
    WorldConfig,
    XAConfig,
    preset,
)
from moshivis_lab.interp.conversation import ConversationEngine, prompt_audio, resolve_image
from moshivis_lab.model import (
    MoshiLM,
    MoshiVis,
    converse,
    load_adapters,
    load_moshi,
    load_moshivis,
    load_moshivis_weights,
    load_weights,
    save_adapters,
    save_moshi,
    save_moshivis,
)
from moshivis_lab.vision import ImageEncoder, VisionConfig
from moshivis_lab.vision.preprocess import preprocess
from moshivis_lab.world.tokenizer import TextTokenizer, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIDE = 16  # preprocess side for the image cases
SR = 24000  # the codecs' rate
N_EXAMPLES = 20  # hypothesis examples per property (modest: the file runs in well under a minute)
HYP = settings(
    max_examples=N_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_HYPOTHESIS_TESTS: dict[str, int] = {}  # class -> number of property tests (for the count)


def _property(kind: str):  # noqa: ANN202
    """Register one hypothesis property of input class ``kind`` (for test_case_counts)."""
    _HYPOTHESIS_TESTS[kind] = _HYPOTHESIS_TESTS.get(kind, 0) + 1
    return HYP


def _flat(msg: str) -> str:
    """An error message without line breaks or rich's box drawing (CLI output)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", msg).split())


# =============================================================================== images


def _png_bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A syntactically valid PNG that claims ``width x height`` pixels (with no real data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def _noise(h: int = 30, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _paletted_with_transparency() -> Image.Image:
    im = Image.new("RGB", (6, 4), (255, 0, 0)).convert("P")
    im.info["transparency"] = im.getpixel((0, 0))
    return im


# In-memory images of every mode: (name, factory, the [0, 1] RGB colour every pixel must get).
IMAGE_MODE_CASES: tuple[tuple[str, Any, tuple[float, float, float]], ...] = (
    ("RGBA transparent", lambda: Image.new("RGBA", (6, 4), (0, 0, 0, 0)), (1.0, 1.0, 1.0)),
    ("RGBA half red", lambda: Image.new("RGBA", (6, 4), (255, 0, 0, 128)), (1.0, 0.498, 0.498)),
    ("LA transparent", lambda: Image.new("LA", (6, 4), (0, 0)), (1.0, 1.0, 1.0)),
    ("L grey", lambda: Image.new("L", (6, 4), 51), (0.2, 0.2, 0.2)),
    ("1 bit", lambda: Image.new("1", (6, 4), 1), (1.0, 1.0, 1.0)),
    ("P palette", lambda: Image.new("RGB", (6, 4), (0, 0, 255)).convert("P"), (0.0, 0.0, 1.0)),
    ("P transparent", _paletted_with_transparency, (1.0, 1.0, 1.0)),
    ("CMYK red", lambda: Image.new("CMYK", (6, 4), (0, 255, 255, 0)), (1.0, 0.0, 0.0)),
    (
        "YCbCr red",
        lambda: Image.new("RGB", (6, 4), (255, 0, 0)).convert("YCbCr"),
        (1.0, 0.0, 0.0),
    ),
    (
        "I;16 white",
        lambda: Image.fromarray(np.full((4, 6), 65535, np.uint16)),
        (1.0, 1.0, 1.0),
    ),
    (
        "I;16 mid grey",
        lambda: Image.fromarray(np.full((4, 6), 32768, np.uint16)),
        (0.5, 0.5, 0.5),
    ),
    ("I 32-bit grey", lambda: Image.fromarray(np.full((4, 6), 51, np.int32)), (0.2, 0.2, 0.2)),
    ("F float grey", lambda: Image.fromarray(np.full((4, 6), 0.25, np.float32)), (0.25,) * 3),
    ("1x1 RGB", lambda: Image.new("RGB", (1, 1), (0, 255, 0)), (0.0, 1.0, 0.0)),
    ("1x1 RGBA", lambda: Image.new("RGBA", (1, 1), (0, 255, 0, 0)), (1.0, 1.0, 1.0)),
)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(im: Image.Image, name: str):  # noqa: ANN202
    def make(d: Path) -> Path:
        p = d / name
        im.save(p)
        return p

    return make


_GOOD_PNG = _png_bytes(Image.fromarray(_noise(64, 64)))
_GOOD_JPEG = _png_bytes(Image.fromarray(_noise(64, 64)), "JPEG")

# Image files: (name, maker(dir) -> path, None for "read correctly" or (error, regex)).
IMAGE_FILE_CASES: tuple[tuple[str, Any, tuple[type, str] | None], ...] = (
    ("RGB png", _save(Image.fromarray(_noise()), "rgb.png"), None),
    ("RGBA png", _save(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "rgba.png"), None),
    ("L png", _save(Image.new("L", (8, 8), 51), "l.png"), None),
    ("P png", _save(Image.new("RGB", (8, 8), (0, 0, 255)).convert("P"), "p.png"), None),
    ("CMYK jpeg", _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "cmyk.jpg"), None),
    (
        "16-bit png",
        _save(Image.fromarray(np.full((8, 8), 32768, np.uint16)), "grey16.png"),
        None,
    ),
    ("32-bit tiff", _save(Image.fromarray(np.full((8, 8), 51, np.int32)), "i32.tif"), None),
    ("1x1 png", _save(Image.new("RGB", (1, 1), (0, 255, 0)), "one.png"), None),
    ("3000x2000 jpeg", _save(Image.new("RGB", (3000, 2000), (0, 0, 255)), "big.jpg"), None),
    (
        "truncated png",
        lambda d: _write(d / "cut.png", _GOOD_PNG[: len(_GOOD_PNG) // 2]),
        (ValueError, r"truncated or damaged"),
    ),
    (
        "truncated jpeg",
        lambda d: _write(d / "cut.jpg", _GOOD_JPEG[: len(_GOOD_JPEG) // 2]),
        (ValueError, r"truncated or damaged"),
    ),
    (
        "png signature only",
        lambda d: _write(d / "sig.png", _GOOD_PNG[:30]),
        (ValueError, r"not an image PIL can read|truncated"),
    ),
    (
        "20000x20000 png header",
        lambda d: _write(d / "bomb.png", _png_header(20000, 20000)),
        (ValueError, r"too large to decode safely .* downscale the file first"),
    ),
    (
        "text file",
        lambda d: _write(d / "notes.png", b"these are my notes, not a picture\n"),
        (ValueError, r"not an image PIL can read .* PNG/JPEG"),
    ),
    ("empty file", lambda d: _write(d / "empty.png", b""), (ValueError, r"empty file \(0 bytes\)")),
    ("missing path", lambda d: d / "absent.png", (FileNotFoundError, r"no such image file")),
    ("directory", lambda d: d, (ValueError, r"is a directory|no such image file")),
)


def _colour(pixels: torch.Tensor) -> np.ndarray:
    """Normalised ``[1, 3, S, S]`` pixel values (mean / std 0.5) -> ``[S, S, 3]`` in [0, 1]."""
    return (pixels[0].permute(1, 2, 0).numpy() * 0.5) + 0.5


@pytest.mark.parametrize(
    ("name", "make", "rgb"), IMAGE_MODE_CASES, ids=[c[0] for c in IMAGE_MODE_CASES]
)
def test_image_modes_are_converted_by_every_image_entry_point(name, make, rgb) -> None:
    want = np.asarray(rgb, np.float32)
    # the encoder's preprocessing (also what ImageEncoder.encode and the engine's tokens use)
    got = _colour(preprocess(make(), SIDE))
    assert got.shape == (SIDE, SIDE, 3)
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=0.006)
    # the conversation engine's image input: an RGB PIL image of the same colours
    pil, image_id = resolve_image(make())
    assert pil.mode == "RGB" and image_id is None and pil.size == make().size
    np.testing.assert_allclose(np.asarray(pil)[0, 0] / 255.0, want, atol=0.006)


def _expected_rgb(path: Path) -> np.ndarray:
    """The [0, 1] colour of pixel (0, 0) of a file, computed independently of the library."""
    with Image.open(path) as im:
        im.load()
        if im.mode.startswith("I;16"):
            return np.full(3, np.asarray(im, np.float64)[0, 0] / 65535.0)
        if im.mode == "I":
            a = np.asarray(im, np.float64)
            return np.full(3, a[0, 0] / (255.0 if a.max() <= 255 else 65535.0))
        if im.mode in ("RGBA", "LA", "PA"):
            a = np.asarray(im.convert("RGBA"), np.float64)[0, 0] / 255.0
            return a[:3] * a[3] + (1.0 - a[3])
        return np.asarray(im.convert("RGB"), np.float64)[0, 0] / 255.0


@pytest.mark.parametrize(
    ("name", "make", "err"), IMAGE_FILE_CASES, ids=[c[0] for c in IMAGE_FILE_CASES]
)
def test_image_files(name, make, err, tmp_path) -> None:
    path = make(tmp_path)
    if err is not None:
        with pytest.raises(err[0], match=err[1]):
            preprocess(path, SIDE)
        # the conversation engine names the file and keeps the reason
        with pytest.raises(err[0], match=r"(cannot be read as an image|no such image).*"):
            resolve_image(path)
        return
    got = _colour(preprocess(path, SIDE))
    want = _expected_rgb(path)
    if name.startswith("RGB png"):  # noise: compare with PIL's own bicubic resize
        with Image.open(path) as im:
            ref = np.asarray(im.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BICUBIC))
        np.testing.assert_allclose(got, ref / 255.0, atol=1e-6)
    else:  # uniform images stay uniform whatever the size, 3000x2000 included
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=0.01)
    pil, _ = resolve_image(path)
    assert pil.mode == "RGB"
    np.testing.assert_allclose(np.asarray(pil)[0, 0] / 255.0, want, atol=0.01)


def test_the_image_encoder_reads_every_kind_of_image(tmp_path) -> None:
    enc = _tiny_vision()
    rgba = Image.new("RGBA", (10, 7), (0, 0, 0, 0))
    white = Image.new("RGB", (10, 7), (255, 255, 255))
    assert torch.equal(enc.encode(rgba), enc.encode(white))  # alpha composited, not dropped
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(path)
    assert torch.allclose(enc.encode(path), enc.encode(white), atol=1e-5)  # 16-bit scaled
    _write(tmp_path / "cut.png", _GOOD_PNG[:-200])
    with pytest.raises(ValueError, match=r"image 1 of 2: .*truncated"):
        enc.encode([white, tmp_path / "cut.png"])


def test_image_tokens_of_user_files_match_the_encoder(tmp_path) -> None:
    from moshivis_lab.train.image_tokens import encode_images

    enc = _tiny_vision()
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(path)
    assert torch.allclose(encode_images(enc, [path], progress=False), enc.encode(path), atol=1e-6)


@pytest.mark.parametrize(
    ("image", "rgb"),
    [
        (Image.new("RGB", (8, 8), (10, 20, 30)), (10, 20, 30)),
        (np.full((8, 8, 3), 7, np.uint8), (7, 7, 7)),
    ],
    ids=["RGB", "uint8 array"],
)
def test_viz_image_figures_take_rgb_images(image, rgb) -> None:
    from moshivis_lab.viz.interp import attention_overlay_figure

    fig = attention_overlay_figure(image, np.ones((2, 2)))
    assert tuple(np.asarray(fig.data[0].z)[0, 0]) == rgb


VIZ_MODE_CASES = (
    ("RGBA transparent", lambda: Image.new("RGBA", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
    ("I;16 dark grey", lambda: Image.fromarray(np.full((8, 8), 16448, np.uint16)), (64, 64, 64)),
    ("I;16 mid grey", lambda: Image.fromarray(np.full((8, 8), 32768, np.uint16)), (128, 128, 128)),
)


@pytest.mark.parametrize(
    ("name", "make", "rgb"), VIZ_MODE_CASES, ids=[c[0] for c in VIZ_MODE_CASES]
)
def test_viz_image_figures_convert_modes_like_the_encoder(name, make, rgb) -> None:
    from moshivis_lab.viz.interp import attention_overlay_figure

    fig = attention_overlay_figure(make(), np.ones((2, 2)))
    assert tuple(np.asarray(fig.data[0].z)[0, 0]) == rgb


def test_the_decompression_bomb_limit_is_a_clear_error_not_an_allocation(tmp_path) -> None:
    # a real (tiny) file whose header claims more pixels than PIL's limit allows: refused from
    # the header, before a byte of pixel memory is allocated
    path = _write(tmp_path / "claims_20000x20000.png", _png_header(20000, 20000))
    with pytest.raises(ValueError, match=r"400000000 pixels.*MAX_IMAGE_PIXELS"):
        preprocess(path, SIDE)
    with pytest.raises(ValueError, match=r"cannot be read as an image .*too large"):
        resolve_image(path)


def _tensor_cases():  # noqa: ANN202
    """Tensors handed to ``ImageEncoder.encode`` (issue 20): converted as the array path, or refused."""
    g = np.random.default_rng(3)
    u8 = torch.from_numpy(g.integers(0, 256, (2, 3, 16, 16), dtype=np.uint8))
    return (
        ("uint8 [B,3,S,S]", u8, None),
        ("uint8 [B,S,S,3]", u8.permute(0, 2, 3, 1).contiguous(), None),
        ("uint8 [3,S,S], no batch", u8[0], None),
        ("float 0..255", u8.float(), r"must be normalised as preprocess does .*0\.\.255|0..255"),
        ("float with NaN", torch.full((1, 3, 16, 16), float("nan")), r"NaN"),
        ("float 0..1 as 2x", torch.rand(1, 3, 16, 16) * 2 + 1.5, r"must be normalised"),
        ("int64 pixels", u8.long(), r"pass uint8 pixels"),
        ("uint8 [B,4,S,S]", torch.zeros(1, 4, 16, 16, dtype=torch.uint8), r"\[B, 3, H, W\]"),
    )


IMAGE_TENSOR_CASES = _tensor_cases()


@pytest.mark.parametrize(
    ("name", "t", "msg"), IMAGE_TENSOR_CASES, ids=[c[0] for c in IMAGE_TENSOR_CASES]
)
def test_image_tensors_are_converted_like_arrays_or_refused(name, t, msg) -> None:
    enc = _tiny_vision()
    if msg is None:
        x = t.unsqueeze(0) if t.ndim == 3 else t
        hwc = x if x.shape[-1] == 3 else x.permute(0, 2, 3, 1)
        want = enc.encode(list(hwc.numpy()))
        assert torch.equal(enc.encode(t), want)
        return
    with pytest.raises((ValueError, TypeError), match=msg):
        enc.encode(t)


def test_forward_refuses_integer_and_non_finite_pixel_values() -> None:
    enc = _tiny_vision()
    with pytest.raises(TypeError, match=r"normalised floats, got a torch.uint8"):
        enc(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"NaN or infinite"):
        enc(torch.full((1, 3, 16, 16), float("inf")))


def _exif_jpeg(path: Path, orientation: int) -> Path:
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue: a turn is visible
    exif = Image.Exif()
    exif[0x0112] = orientation
    im.save(path, "JPEG", exif=exif, quality=95)
    return path


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_honoured_by_every_image_entry_point(orientation, tmp_path) -> None:
    from PIL import ImageOps

    from moshivis_lab.vision.preprocess import open_image

    path = _exif_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    with Image.open(path) as raw:
        upright = ImageOps.exif_transpose(raw)
        assert np.array_equal(np.asarray(open_image(path)), np.asarray(upright))
        want = preprocess(np.asarray(upright), SIDE)
        assert torch.equal(preprocess(raw, SIDE), want)  # a PIL image opened by the user
    assert torch.equal(preprocess(path, SIDE), want)  # a path
    if orientation in (6, 8):
        assert open_image(path).size == (20, 40)


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path) -> None:
    # 9600 x 9600 = 92 M pixels: over MAX_IMAGE_PIXELS (89 M), under PIL's own 2x error limit
    path = _write(tmp_path / "claims_9600x9600.png", _png_header(9600, 9600))
    assert Image.MAX_IMAGE_PIXELS < 9600 * 9600 < 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match=r"92160000 pixels, over PIL.Image.MAX_IMAGE_PIXELS"):
        preprocess(path, SIDE)


_arrays = st.one_of(
    st.tuples(
        st.sampled_from([np.uint8, np.uint16, np.int32, np.float16, np.float32, np.float64, bool]),
        st.lists(st.integers(0, 5), min_size=1, max_size=4),
        st.sampled_from([0.0, 0.5, 1.0, 255.0, -1.0, np.nan, np.inf]),
    ),
)


@_property("images")
@given(spec=_arrays)
def test_any_array_is_preprocessed_or_refused_clearly(spec) -> None:
    dtype, shape, fill = spec
    with np.errstate(invalid="ignore"):
        arr = np.full(shape, fill).astype(dtype) if dtype is not bool else np.zeros(shape, bool)
    try:
        out = preprocess(arr, 8)
    except (ValueError, TypeError) as e:
        assert len(str(e)) > 20  # a sentence, not a bare code
        return
    assert out.shape == (1, 3, 8, 8) and torch.isfinite(out).all()
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 1.0 + 1e-6


@_property("images")
@given(cut=st.integers(0, len(_GOOD_PNG) - 1), fmt=st.sampled_from(["png", "jpg"]))
def test_any_truncation_is_refused_or_harmless(cut, fmt, tmp_path_factory) -> None:
    data = _GOOD_PNG if fmt == "png" else _GOOD_JPEG
    cut = min(cut, len(data) - 1)
    path = _write(tmp_path_factory.mktemp("cut") / f"x.{fmt}", data[:cut])
    try:
        got = preprocess(path, SIDE)
    except ValueError as e:
        assert re.search(r"empty file|not an image|truncated or damaged", str(e)), str(e)
        return
    # only the file's trailer was cut: every pixel is there, so the result is the full image's
    full = preprocess(_write(path.with_name(f"full.{fmt}"), data), SIDE)
    assert torch.equal(got, full)


# =============================================================================== audio


def _tone(seconds: float = 0.5, sr: int = SR, f: float = 220.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * f * t)).astype(np.float32)


REF = _tone()  # the mono float32 24 kHz signal every converted case must become


def _int(x: np.ndarray, dtype: type) -> np.ndarray:
    info = np.iinfo(dtype)
    if info.min == 0:  # unsigned: offset binary
        return np.round(x * (info.max + 1) / 2 + (info.max + 1) / 2).clip(0, info.max).astype(dtype)
    return np.round(x * -float(info.min)).clip(info.min, info.max).astype(dtype)


# Arrays: (name, samples, their rate, tolerance vs REF) -> converted to REF.
AUDIO_CONVERTED_CASES: tuple[tuple[str, np.ndarray, int, float], ...] = (
    ("mono float32", REF, SR, 0.0),
    ("float64", REF.astype(np.float64), SR, 1e-7),
    ("int8", _int(REF, np.int8), SR, 1 / 128),
    ("uint8 (8-bit WAV PCM)", _int(REF, np.uint8), SR, 1 / 128),
    ("int16", _int(REF, np.int16), SR, 1 / 32768),
    ("int32", _int(REF, np.int32), SR, 1e-7),
    ("stereo [2, N]", np.stack([REF, REF]), SR, 0.0),
    ("stereo [N, 2]", np.stack([REF, REF], axis=1), SR, 0.0),
    ("stereo int16 [N, 2]", np.stack([_int(REF, np.int16)] * 2, axis=1), SR, 1 / 32768),
    ("8 kHz", _tone(sr=8000), 8000, 0.02),
    ("44.1 kHz", _tone(sr=44100), 44100, 0.02),
    ("48 kHz", _tone(sr=48000), 48000, 0.02),
    ("48 kHz stereo int16", np.stack([_int(_tone(sr=48000), np.int16)] * 2), 48000, 0.02),
)

# Arrays every entry point refuses: (name, samples, regex).
AUDIO_REFUSED_CASES: tuple[tuple[str, Any, str], ...] = (
    ("NaN", np.where(np.arange(REF.size) == 100, np.nan, REF), r"1 samples are NaN or inf"),
    ("inf", np.where(np.arange(REF.size) == 7, np.inf, REF), r"NaN or inf; clean the signal"),
    ("NaN in one channel", np.stack([REF, np.full_like(REF, np.nan)]), r"NaN or inf"),
    ("float beyond full scale", REF * 4, r"must lie in \[-1, 1\] .* divide by the full-scale"),
    ("float in int16 units", REF * 32767, r"must lie in \[-1, 1\]"),
    ("3-D array", np.zeros((2, 2, 100), np.float32), r"1-D \(mono\) or 2-D"),
    (
        "2-D, not channels",
        np.zeros((50, 60), np.float32),
        r"does not look like \[channels, samples\]",
    ),
    ("strings", np.array(["a", "b"]), r"numeric array of samples"),
    ("complex", REF.astype(np.complex64), r"numeric array of samples"),
)


@pytest.mark.parametrize(
    ("name", "wav", "sr", "tol"), AUDIO_CONVERTED_CASES, ids=[c[0] for c in AUDIO_CONVERTED_CASES]
)
def test_audio_arrays_are_converted(name, wav, sr, tol) -> None:
    got = prepare(wav, sr, SR)
    assert got.dtype == np.float32 and got.ndim == 1
    assert abs(got.size - REF.size) <= 1
    n = min(got.size, REF.size)
    edge = 200 if sr != SR else 0  # the resampler's filter settles over the first samples
    np.testing.assert_allclose(got[edge : n - edge], REF[edge : n - edge], atol=tol + 1e-6)


@pytest.fixture(scope="module")
def codec() -> TinyCodec:
    """A tiny codec with zero tables: its input checks and analysis are the real ones."""
    cfg = dataclasses.replace(CodecConfig.tiny(), semantic="kmeans")
    return TinyCodec(cfg, {k: np.zeros(s) for k, s in TinyCodec.table_shapes(cfg).items()})


@pytest.mark.parametrize(
    ("name", "wav", "sr", "tol"),
    [c for c in AUDIO_CONVERTED_CASES if c[2] == SR],
    ids=[c[0] for c in AUDIO_CONVERTED_CASES if c[2] == SR],
)
def test_the_codec_analyses_converted_audio_as_the_mono_float(codec, name, wav, sr, tol) -> None:
    ref, got = codec.features(REF, SR), codec.features(wav, sr)
    for field in ("logf0", "voicing", "energy", "shape"):
        a, b = getattr(ref, field), getattr(got, field)
        assert a.shape == b.shape
        if tol == 0.0:
            assert np.array_equal(a, b, equal_nan=True), field
    assert codec.encode(wav, sr).shape == (8, math.ceil(REF.size / 1920))


@pytest.mark.parametrize(
    ("name", "wav", "msg"), AUDIO_REFUSED_CASES, ids=[c[0] for c in AUDIO_REFUSED_CASES]
)
def test_audio_arrays_are_refused_by_every_entry_point(codec, lm_and_codec, name, wav, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        prepare(wav, SR, SR)
    with pytest.raises(ValueError, match=msg):
        codec.encode(wav)
    with pytest.raises(ValueError, match=msg):
        prompt_audio(wav, SR, prompt_rate=SR)
    model, fake = lm_and_codec
    with pytest.raises(ValueError, match=msg):
        converse(model, fake, None, wav, SR)
    from moshivis_lab.audio.prosody import prosody_features

    with pytest.raises(ValueError, match=msg):
        prosody_features(wav, SR)


def test_empty_and_silent_audio(codec, lm_and_codec) -> None:
    from moshivis_lab.audio.prosody import prosody_features

    empty = np.zeros(0, np.float32)
    assert prepare(empty, SR, SR).size == 0  # nothing to convert is not an error here...
    with pytest.raises(ValueError, match="the waveform is empty; there is nothing to encode"):
        codec.encode(empty)
    with pytest.raises(ValueError, match=r"too short; at least 0.050 s"):
        prompt_audio(empty, SR, prompt_rate=SR)
    with pytest.raises(ValueError, match=r"too short"):
        prosody_features(empty, SR)
    model, fake = lm_and_codec
    with pytest.raises(ValueError, match="user_wav is empty"):
        converse(model, fake, None, empty, SR)
    silence = np.zeros(SR, np.int16)  # pure digital silence, as 16-bit PCM
    codes = codec.encode(silence, SR)  # the codec encodes silence (it is a valid signal)
    assert codes.shape == (8, 13) and (codes == codes[:, :1]).all()
    with pytest.raises(ValueError, match=r"prompt audio is silent .* allow_silence=True"):
        prompt_audio(silence, SR, prompt_rate=SR)
    wav, text = prompt_audio(silence, SR, prompt_rate=SR, allow_silence=True)
    assert text is None and wav.size == SR and not wav.any()
    p = prosody_features(silence, SR)  # no voice: no F0, no speech, not made-up numbers
    assert not p.voiced.any() and np.isnan(p.f0).all()
    assert not np.isfinite(p.summary.get("f0_median", np.nan))


def test_sample_rates_must_be_positive_integers() -> None:
    for sr in (0, -8000, 16000.5, None, "48k"):
        with pytest.raises(ValueError, match="sample_rate must be a positive integer"):
            prepare(REF, sr, SR)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs its sample rate"):
        prompt_audio(REF, SR)
    with pytest.raises(ValueError, match="sample rates must be positive"):
        resample(REF, SR, 0)


# WAV files: (name, subtype, channels, rate) -> read as REF; or (name, bytes, regex) refused.
WAV_CASES: tuple[tuple[str, str, int, int], ...] = (
    ("8-bit unsigned", "PCM_U8", 1, SR),
    ("16-bit", "PCM_16", 1, SR),
    ("24-bit", "PCM_24", 1, SR),
    ("32-bit int", "PCM_32", 1, SR),
    ("32-bit float", "FLOAT", 1, SR),
    ("64-bit float", "DOUBLE", 1, SR),
    ("stereo 16-bit", "PCM_16", 2, SR),
    ("stereo 8 kHz", "PCM_16", 2, 8000),
    ("44.1 kHz", "PCM_16", 1, 44100),
    ("48 kHz", "PCM_16", 1, 48000),
)
BAD_AUDIO_FILE_CASES: tuple[tuple[str, bytes | None, str], ...] = (
    ("text file", b"not a recording\n", r"cannot be read as audio .* valid wav/flac/ogg"),
    ("empty file", b"", r"cannot be read as audio"),
    ("truncated header", b"RIFF\x24\x00\x00\x00WAVEfmt ", r"cannot be read as audio"),
    ("missing path", None, r"no such audio file"),
)


@pytest.mark.parametrize(
    ("name", "subtype", "channels", "sr"), WAV_CASES, ids=[c[0] for c in WAV_CASES]
)
def test_wav_files_are_read_as_mono_at_the_wanted_rate(
    name, subtype, channels, sr, tmp_path
) -> None:
    x = _tone(sr=sr)
    path = tmp_path / "in.wav"
    sf.write(path, np.stack([x] * channels, axis=1), sr, subtype=subtype)
    got = load_audio(path, SR)
    tol = {"PCM_U8": 1 / 64, "PCM_16": 1e-4}.get(subtype, 1e-6) + (0.02 if sr != SR else 0)
    assert got.dtype == np.float32 and abs(got.size - REF.size) <= 1
    n, edge = min(got.size, REF.size), (200 if sr != SR else 0)
    np.testing.assert_allclose(got[edge : n - edge], REF[edge : n - edge], atol=tol)
    # the conversation engine's prompt takes the same file (a user's recording)
    wav, text = prompt_audio(path, SR)
    assert text is None and np.array_equal(wav, got)


@pytest.mark.parametrize(
    ("name", "data", "msg"), BAD_AUDIO_FILE_CASES, ids=[c[0] for c in BAD_AUDIO_FILE_CASES]
)
def test_bad_audio_files_are_refused(name, data, msg, tmp_path) -> None:
    path = tmp_path / "in.wav"
    if data is not None:
        path.write_bytes(data)
    err = FileNotFoundError if data is None else ValueError
    with pytest.raises(err, match=msg):
        load_audio(path, SR)
    with pytest.raises(err, match=msg):
        prompt_audio(path, SR)


def test_an_empty_or_silent_wav_file(tmp_path) -> None:
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1)), SR, subtype="PCM_16")
    assert load_audio(tmp_path / "empty.wav", SR).size == 0
    with pytest.raises(ValueError, match="too short"):
        load_audio(tmp_path / "empty.wav", SR, min_seconds=0.05)
    with pytest.raises(ValueError, match="too short"):
        prompt_audio(tmp_path / "empty.wav", SR)
    sf.write(tmp_path / "silent.wav", np.zeros((SR, 2)), 48000, subtype="PCM_16")
    with pytest.raises(ValueError, match="silent"):
        prompt_audio(tmp_path / "silent.wav", SR)


def _square(seconds: float, sr: int) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return np.sign(np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)


@pytest.mark.parametrize(
    ("subtype", "dtype", "sr"),
    [("PCM_32", np.int32, 44100), ("PCM_16", np.int16, 48000), ("FLOAT", np.float32, 16000)],
)
def test_resampled_full_scale_audio_is_accepted_by_every_consumer(
    codec, subtype, dtype, sr, tmp_path
) -> None:
    from moshivis_lab.audio.prosody import prosody_features

    sq = _square(0.5, sr)
    pcm = sq if dtype is np.float32 else (sq.astype(np.float64) * np.iinfo(dtype).max).astype(dtype)
    path = tmp_path / "full_scale.wav"
    sf.write(path, pcm, sr, subtype=subtype)
    wav = load_audio(path, SR)
    assert np.abs(wav).max() <= 1.0  # soxr rings to ~1.07 on a full-scale square: clipped
    assert codec.encode(wav).shape[0] == 8
    assert prompt_audio(wav, SR, prompt_rate=SR)[0].size == wav.size
    prosody_features(wav, SR)
    assert np.abs(prepare(pcm, sr, SR)).max() <= 1.0  # the array path too


@pytest.mark.parametrize("channels", [9, 16])
def test_many_channel_wav_files_are_mixed_to_mono(channels, tmp_path) -> None:
    tone = _tone(0.25)
    data = np.stack([tone * (c + 1) / (2 * channels) for c in range(channels)], axis=1)
    path = tmp_path / f"{channels}ch.wav"
    sf.write(path, data, SR, subtype="FLOAT")
    wav = load_audio(path, SR)
    assert wav.shape == (tone.size,)
    assert np.allclose(wav, data.mean(axis=1), atol=1e-6)


def test_the_channel_axis_advice_can_be_followed() -> None:
    many = np.stack([_tone(0.1)] * 9)  # [9, samples]: more channels than the guess allows
    with pytest.raises(ValueError, match=r"channel_axis=0 \(channels first\)"):
        prepare(many, SR, SR)
    assert prepare(many, SR, SR, channel_axis=0).shape == (many.shape[1],)
    assert prepare(many.T, SR, SR, channel_axis=1).shape == (many.shape[1],)
    with pytest.raises(ValueError, match="channel_axis must be 0 or 1"):
        prepare(many, SR, SR, channel_axis=2)


def test_ten_minutes_of_audio(tmp_path) -> None:
    # ten minutes at 8 kHz, 16-bit: read and resampled in full (the length is exact)...
    minutes = 10
    x = _int(np.tile(_tone(1.0, 8000, amp=0.1), 60 * minutes), np.int16)
    sf.write(tmp_path / "long.wav", x, 8000, subtype="PCM_16")
    got = load_audio(tmp_path / "long.wav", SR)
    assert got.size == 60 * minutes * SR and np.isfinite(got).all()
    # ... and the conversation engine refuses it before any encoding: a conversation holds 60 s
    encoded = []
    codec = types.SimpleNamespace(
        sample_rate=SR, frame_size=1920, frame_rate=12.5, encode=lambda w: encoded.append(w)
    )
    model = types.SimpleNamespace(encode_image=None, gate_override=None)
    engine = ConversationEngine(model, codec, None, None, user_voice=object())
    with pytest.raises(ValueError, match=r"would last 603\.6 s; at most 60 s: trim the prompt"):
        engine.run(None, tmp_path / "long.wav")
    assert not encoded


@_property("audio")
@given(
    dtype=st.sampled_from([np.int8, np.uint8, np.int16, np.int32, np.float32, np.float64]),
    channels=st.sampled_from([0, 1, 2, 6]),
    sr=st.sampled_from([8000, 11025, 16000, 22050, 24000, 44100, 48000, 96000]),
    n=st.one_of(st.just(0), st.integers(16, 3000)),  # below 9 samples [C, N] is ambiguous
    seed=st.integers(0, 2**16),
)
def test_any_pcm_array_becomes_clean_mono_float(dtype, channels, sr, n, seed) -> None:
    x = np.random.default_rng(seed).uniform(-1, 1, (max(channels, 1), n)).astype(np.float32)
    arr = _int(x, dtype) if np.issubdtype(dtype, np.integer) else x.astype(dtype)
    arr = arr[0] if channels == 0 else arr
    out = prepare(arr, sr, SR)
    assert out.dtype == np.float32 and out.ndim == 1 and np.isfinite(out).all()
    assert abs(out.size - n * SR / sr) <= 1
    mono = to_mono_float(arr)
    assert mono.shape == (n,) and np.abs(mono).max(initial=0) <= 1.0
    if channels > 1:  # stereo and more: the mean of the channels, either layout
        each = np.mean([to_mono_float(c) for c in arr], axis=0)
        np.testing.assert_allclose(mono, each, atol=1e-6)
        np.testing.assert_array_equal(to_mono_float(arr.T), mono)


@_property("audio")
@given(
    n_bad=st.integers(1, 5),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    seed=st.integers(0, 1000),
)
def test_any_non_finite_sample_is_refused_with_the_count(n_bad, bad, seed) -> None:
    x = _tone(0.1).astype(np.float64)
    idx = np.random.default_rng(seed).choice(x.size, n_bad, replace=False)
    x[idx] = bad
    with pytest.raises(ValueError, match=rf"{n_bad} samples are NaN or inf"):
        prepare(x, SR, SR)


# =============================================================================== text

TEXT_CASES: tuple[tuple[str, str], ...] = (
    ("empty", ""),
    ("whitespace only", " \t\n  "),
    ("accents", "Où est la sphère verte, s'il vous plaît ? Ça va, naïve café crème."),
    ("combining accent", "cafe\u0301 re\u0301sume\u0301"),
    ("CJK", "赤い星はどこですか 这是什么颜色"),
    ("emoji", "what colour is the 🌟 next to the 🐱? 👍🏽"),
    ("right-to-left", "שלום مرحبا"),
    ("control characters", "red\x00 star\x07 here\x1b"),
    ("100k characters", "the small red star is left of the blue square. " * 2128),
    ("100k characters, no spaces", "x" * 100_000),
)


SURROGATE_CASES: tuple[tuple[str, str, int], ...] = (
    ("lone high surrogate", "ab\ud800cd", 2),
    ("lone low surrogate first", "\udc00abc", 0),
    ("surrogateescape'd bytes", b"red \xff star".decode("utf-8", "surrogateescape"), 4),
    ("half an emoji pair at the end", "the star \ud83c", 9),
)


@pytest.mark.parametrize(
    ("name", "text", "pos"), SURROGATE_CASES, ids=[c[0] for c in SURROGATE_CASES]
)
def test_text_that_is_not_unicode_is_refused_with_its_position(tokenizer, name, text, pos) -> None:
    with pytest.raises(ValueError, match=rf"lone surrogate .* at position {pos} "):
        tokenizer.encode(text)
    fixed = text.encode("utf-8", "replace").decode("utf-8")  # the advice, followed
    assert tokenizer.encode(fixed)


def test_tts_refuses_a_lone_surrogate_clearly() -> None:
    from moshivis_lab.world.speech import ASSISTANT_VOICE, synthesize

    with pytest.raises(
        ValueError, match=r"TTS text holds a lone surrogate '\\ud800' at position 2"
    ):
        synthesize("ab\ud800cd", ASSISTANT_VOICE)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> TextTokenizer:
    """The tiny tokenizer's recipe (byte fallback) on a few world-like sentences."""
    words = "the a red blue green star square circle is left right of above below what colour"
    rng = np.random.default_rng(0)
    sentences = [" ".join(rng.choice(words.split(), 8)) for _ in range(300)]
    return train_tokenizer(sentences, tmp_path_factory.mktemp("tok") / "spm.model", vocab_size=400)


@pytest.fixture(scope="module")
def strict_tokenizer(tmp_path_factory) -> TextTokenizer:
    """A SentencePiece model without byte fallback (as some real tokenizers are)."""
    import sentencepiece as spm

    sentences = ["the red star is left of the blue square"] * 50 + ["what colour is it"] * 50
    path = tmp_path_factory.mktemp("strict") / "spm.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(path.with_suffix("")),
        vocab_size=40, model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        hard_vocab_limit=False, byte_fallback=False, num_threads=1, minloglevel=2,
    )  # fmt: skip
    return TextTokenizer.load(path)


@pytest.mark.parametrize(("name", "text"), TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_text_is_tokenised_without_special_ids(tokenizer, name, text) -> None:
    ids = tokenizer.encode(text)
    if not text.strip():
        assert ids == []
        return
    assert ids and all(0 <= i < tokenizer.vocab_size for i in ids)
    # byte fallback: every character is spelled, none becomes <unk> = Moshi's EPAD / PAD
    assert tokenizer.epad_id not in ids and tokenizer.pad_id not in ids
    back = tokenizer.decode(ids)
    assert tokenizer.encode(back) == ids  # decoding loses nothing the model saw
    if text.isascii() and text.isprintable():
        assert back == " ".join(text.split())


@pytest.mark.parametrize(("name", "text"), TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_a_tokenizer_without_byte_fallback_refuses_what_it_cannot_spell(
    strict_tokenizer, name, text
):
    spellable = set("the red star is left of blue square what colour it ")
    normal = " ".join(text.split())
    if set(normal.lower()) <= spellable or not normal:
        assert tokenizer_ok(strict_tokenizer, text)
        return
    try:
        ids = strict_tokenizer.encode(text)
    except ValueError as e:
        assert "has no piece for" in str(e) and "EPAD" in str(e)
        return
    assert strict_tokenizer.epad_id not in ids  # never a silent <unk> = EPAD


def tokenizer_ok(tok: TextTokenizer, text: str) -> bool:
    ids = tok.encode(text)
    return tok.epad_id not in ids


def test_text_that_is_not_text(tokenizer) -> None:
    for bad in (None, b"bytes", 42, ["a", "list"]):
        with pytest.raises(ValueError, match="text must be a str"):
            tokenizer.encode(bad)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="no tokenizer here"):
        TextTokenizer.load("/nowhere/spm.model")


def test_bad_tokenizer_files(tmp_path) -> None:
    (tmp_path / "notes.model").write_text("not a sentencepiece model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        TextTokenizer.load(tmp_path / "notes.model")
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        TextTokenizer.load(tmp_path / "empty.model")


@_property("text")
@given(text=st.text(max_size=200))
def test_any_unicode_text_is_tokenised_and_round_trips(tokenizer, text) -> None:
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size and i not in (0, 3) for i in ids)
    assert tokenizer.encode(tokenizer.decode(ids)) == ids


@_property("text")
@given(text=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200))
def test_printable_ascii_round_trips_exactly(tokenizer, text) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == " ".join(text.split())


PROMPT_CASES: tuple[tuple[str, str, str | None], ...] = (
    ("empty", "", r"prompt text is empty"),
    ("whitespace", "  \n\t ", r"prompt text is empty"),
    (
        "100k characters",
        "where is the red star? " * 4348,
        r"100003 characters; .* shorter question",
    ),
    ("accents", "Où est l'étoile rouge ?", None),
    ("emoji", "what colour is the 🌟?", None),
)


@pytest.mark.parametrize(("name", "text", "msg"), PROMPT_CASES, ids=[c[0] for c in PROMPT_CASES])
def test_conversation_prompts(name, text, msg) -> None:
    from moshivis_lab.world.speech import USER_VOICES

    if msg is not None:
        with pytest.raises(ValueError, match=msg):
            prompt_audio(text, SR, voice=USER_VOICES[-1])
        return
    wav, said = prompt_audio(text, SR, voice=USER_VOICES[-1])
    assert said == " ".join(text.split()) and wav.dtype == np.float32 and wav.size > SR // 4
    assert np.isfinite(wav).all()


def test_text_replies_with_odd_prompts(tokenizer) -> None:
    from moshivis_lab.train.vis_eval import text_replies

    lm = dataclasses.replace(
        LMConfig.tiny(), dim=32, num_layers=1, num_heads=2, text_card=tokenizer.vocab_size,
        card=32, context=16, depformer_dim=16, depformer_num_layers=1, depformer_num_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MoshiVis(MoshiVisConfig.tiny(lm, image_dim=8)).eval()
    prompts = ["Où est l'étoile ? 🌟", "赤い星", "the red star " * 5]
    replies = text_replies(model, tokenizer, prompts, None, max_new_tokens=3)
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)


def test_text_replies_refuse_an_empty_prompt_clearly(tokenizer) -> None:
    from moshivis_lab.train.vis_eval import text_replies

    lm = dataclasses.replace(
        LMConfig.tiny(), dim=32, num_layers=1, num_heads=2, text_card=tokenizer.vocab_size,
        card=32, context=16, depformer_dim=16, depformer_num_layers=1, depformer_num_heads=2,
    )  # fmt: skip
    model = MoshiVis(MoshiVisConfig.tiny(lm, image_dim=8)).eval()
    with pytest.raises(ValueError, match="empty"):
        text_replies(model, tokenizer, [""], None, max_new_tokens=2)


# =============================================================================== configs


def _vision_pretrain_cls():  # noqa: ANN202
    from moshivis_lab.vision.pretrain import VisionPretrainConfig

    return VisionPretrainConfig


# The configs whose fields are all type-checked on construction (config.py, vision/).
TYPED_CONFIGS: tuple[tuple[str, Any], ...] = (
    ("WorldConfig", WorldConfig),
    ("CodecConfig", CodecConfig),
    ("TokenizerConfig", TokenizerConfig),
    ("LMConfig", LMConfig),
    ("LabConfig", LabConfig),
    ("XAConfig", XAConfig),
    ("VisionConfig", VisionConfig),
    ("VisionPretrainConfig", _vision_pretrain_cls()),
)


def _numeric_fields(cls: type) -> list[tuple[str, str]]:
    out = []
    for f in dataclasses.fields(cls):
        kinds = [k.strip() for k in str(f.type).split("|") if k.strip() != "None"]
        if len(kinds) == 1 and kinds[0] in ("int", "float"):
            out.append((f.name, kinds[0]))
    return out


# Values of the wrong kind for any int / float field: (label, value, only for int fields).
WRONG_KIND_VALUES: tuple[tuple[str, Any, bool], ...] = (
    ("NaN", float("nan"), False),
    ("inf", float("inf"), False),
    ("-inf", float("-inf"), False),
    ("string", "12", False),
    ("bool", True, False),
    ("list", [1], False),
    ("2.5 for an int", 2.5, True),
)
CONFIG_TYPE_CASES: tuple[tuple[str, type, str, str, Any], ...] = tuple(
    (f"{name}.{field}={label}", cls, name, field, value)
    for name, cls in TYPED_CONFIGS
    for field, kind in _numeric_fields(cls)
    for label, value, int_only in WRONG_KIND_VALUES
    if kind == "int" or not int_only
)

# Domain errors of the configs owned elsewhere (train/, reproduce.py): their own checks.
CONFIG_DOMAIN_CASES: tuple[tuple[str, str, dict[str, Any], str], ...] = (
    ("TrainConfig steps 0", "TrainConfig", {"steps": 0}, "TrainConfig.steps"),
    ("TrainConfig lr NaN", "TrainConfig", {"lr": float("nan")}, "TrainConfig.lr"),
    ("TrainConfig beta2 1", "TrainConfig", {"beta2": 1.0}, "TrainConfig.beta2"),
    ("TrainConfig warmup>steps", "TrainConfig", {"steps": 5, "warmup_steps": 9}, "warmup_steps"),
    ("TrainConfig minutes -1", "TrainConfig", {"minutes": -1.0}, "TrainConfig.minutes"),
    ("PretrainConfig batch 0", "PretrainConfig", {"batch_size": 0}, "PretrainConfig.batch_size"),
    ("PretrainConfig lr -1", "PretrainConfig", {"lr": -1.0}, "PretrainConfig.lr"),
    ("PretrainConfig min_lr 2", "PretrainConfig", {"min_lr_ratio": 2.0}, "min_lr_ratio"),
    ("MixConfig p_audio 1.5", "MixConfig", {"p_audio": 1.5}, "MixConfig.p_audio"),
    ("MixConfig p_audio NaN", "MixConfig", {"p_audio": float("nan")}, "MixConfig.p_audio"),
    ("MixConfig speech_len 4", "MixConfig", {"speech_len": 4}, "MixConfig.speech_len"),
    ("AblateConfig steps 0", "AblateConfig", {"steps": 0}, "AblateConfig.steps"),
    ("AblateConfig p_audio 2", "AblateConfig", {"p_audio": (0.0, 2.0)}, "AblateConfig.p_audio"),
    ("ReproduceConfig threads 0", "ReproduceConfig", {"threads": 0}, "ReproduceConfig.threads"),
    ("ReproduceConfig 2.5", "ReproduceConfig", {"eval_speech": 2.5}, "ReproduceConfig.eval_speech"),
    ("ReproduceConfig ablate", "ReproduceConfig", {"ablate": "huge"}, "ReproduceConfig.ablate"),
    ("ReproduceConfig run", "ReproduceConfig", {"run": ""}, "ReproduceConfig.run"),
)


def _other_config(name: str) -> type:
    from moshivis_lab.reproduce import ReproduceConfig
    from moshivis_lab.train.ablate import AblateConfig
    from moshivis_lab.train.adapters import TrainConfig
    from moshivis_lab.train.mix import MixConfig
    from moshivis_lab.train.pretrain import PretrainConfig

    return {
        "TrainConfig": TrainConfig,
        "PretrainConfig": PretrainConfig,
        "MixConfig": MixConfig,
        "AblateConfig": AblateConfig,
        "ReproduceConfig": ReproduceConfig,
    }[name]


@pytest.mark.parametrize(
    ("case", "cls", "name", "field", "value"),
    CONFIG_TYPE_CASES,
    ids=[c[0] for c in CONFIG_TYPE_CASES],
)
def test_configs_refuse_values_of_the_wrong_kind_naming_the_field(case, cls, name, field, value):
    with pytest.raises(
        ValueError, match=rf"^{name}\.{field}: must be (an integer|a finite number)"
    ):
        cls(**{field: value})


@pytest.mark.parametrize(
    ("case", "name", "kw", "msg"), CONFIG_DOMAIN_CASES, ids=[c[0] for c in CONFIG_DOMAIN_CASES]
)
def test_training_configs_refuse_bad_values_naming_the_field(case, name, kw, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        _other_config(name)(**kw)


_BAD_NUMBERS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.text(max_size=4),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)


@_property("configs")
@given(data=st.data())
def test_any_wrong_kind_of_value_names_its_field(data) -> None:
    name, cls = data.draw(st.sampled_from(TYPED_CONFIGS))
    field, kind = data.draw(st.sampled_from(_numeric_fields(cls)))
    optional = "None" in str(next(f.type for f in dataclasses.fields(cls) if f.name == field))
    bad = _BAD_NUMBERS | (
        st.floats(-1e6, 1e6).filter(lambda v: not float(v).is_integer())
        if kind == "int"
        else st.nothing()
    )
    value = data.draw(bad.filter(lambda v: not (v is None and optional)))
    with pytest.raises(ValueError, match=rf"^{name}\.{field}: "):
        cls(**{field: value})


@_property("configs")
@given(
    name=st.text(max_size=12).filter(lambda s: s not in PRESETS),
)
def test_unknown_preset_names_list_the_known_ones(name) -> None:
    with pytest.raises(
        ValueError, match=r"unknown preset .* choose one of \['moshika-vis', 'smoke', 'tiny'\]"
    ):
        preset(name)


def test_nested_and_dict_configs() -> None:
    with pytest.raises(ValueError, match=r"^LMConfig\.dim: must be an integer"):
        MoshiVisConfig(lm={**dataclasses.asdict(LMConfig.tiny()), "dim": "256"})
    with pytest.raises(ValueError, match=r"^XAConfig\.xa_layers: must be a sequence of integers"):
        XAConfig(xa_layers=(0, 1.5))
    with pytest.raises(
        ValueError, match=r"^VisionConfig\.image_mean: must be a sequence of finite"
    ):
        VisionConfig(image_mean=(0.5, float("nan"), 0.5))
    with pytest.raises(ValueError, match=r"^WorldConfig\.pause_range_s: must be a sequence"):
        WorldConfig(pause_range_s=(0.1, float("inf")))
    with pytest.raises(ValueError, match=r"^CodecConfig\.frame_rate: must be a finite number"):
        CodecConfig(frame_rate=float("inf"))  # would give a 0-sample frame
    # numpy scalars are numbers like any other
    assert WorldConfig(image_size=np.int64(128), p_word=np.float32(0.5)).image_size == 128
    assert TokenizerConfig(model_path=Path("/x/spm.model")).model_path == Path("/x/spm.model")


STORED_CONFIG_CASES: tuple[tuple[str, Any, str | None], ...] = (
    ("broken JSON", '{"dim": 32,', r"is not valid JSON .* write it again"),
    ("a JSON list", "[1, 2, 3]", r"is a JSON list, not an object of fields"),
    ("a JSON string", '"tiny"', r"is a JSON str, not an object of fields"),
    ("a JSON number", "7", r"is a JSON int, not an object of fields"),
    ("an unknown field", {"future_knob": 1}, None),
    (
        "a refused value",
        "refused",
        r"(LMConfig\.dim|VisionConfig\.hidden_size): must be an integer",
    ),
)


@pytest.mark.parametrize(
    ("name", "stored", "msg"), STORED_CONFIG_CASES, ids=[c[0] for c in STORED_CONFIG_CASES]
)
def test_every_loader_reads_stored_configs_with_one_policy(
    lm_and_codec, vis, name, stored, msg, tmp_path
) -> None:
    from moshivis_lab.model.checkpoint import CONFIG_KEY as LM_KEY
    from moshivis_lab.model.checkpoint import to_released
    from moshivis_lab.model.vis_checkpoint import CONFIG_KEY as VIS_KEY
    from moshivis_lab.model.vis_checkpoint import read_moshivis_config

    def text(base: dict[str, Any], refused: dict[str, Any], nest: str | None = None) -> str:
        if stored == "refused":
            extra = refused
        elif isinstance(stored, str):
            return stored
        else:
            extra = stored
        if nest:
            return json.dumps({**base, nest: {**base[nest], **extra}})
        return json.dumps({**base, **extra})

    model, _ = lm_and_codec
    lm_file = tmp_path / "lm.safetensors"
    state = {k: v.contiguous() for k, v in to_released(model.state_dict()).items()}
    lm_meta = text(dataclasses.asdict(LM_CFG), {"dim": "wide"})
    save_file(state, str(lm_file), metadata={"format": "pt", LM_KEY: lm_meta})
    vis_file = tmp_path / "vis.safetensors"
    save_moshivis(vis, vis_file)
    _rewrite_meta(vis_file, {VIS_KEY: text(vis.cfg.to_dict(), {"dim": "wide"}, nest="lm")})
    vdir = tmp_path / "vision"
    _tiny_vision().save(vdir)
    vc = json.loads((vdir / "vision_config.json").read_text())
    (vdir / "vision_config.json").write_text(text(vc, {"hidden_size": "wide"}))
    readers = {
        lm_file: lambda: load_moshi(lm_file),
        vis_file: lambda: read_moshivis_config(vis_file),
        vdir: lambda: ImageEncoder.load(vdir),
    }
    for path, read in readers.items():
        if msg is None:
            with pytest.warns(
                UserWarning, match=r"dropped unknown \w+ field\(s\) \['future_knob'\]"
            ):
                read()
            continue
        with pytest.raises(ValueError, match=msg) as e:
            read()
        assert str(path) in str(e.value), str(e.value)  # the file is named


def _rewrite_meta(path: Path, changes: dict[str, str]) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {**(f.metadata() or {}), **changes}
        state = {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, str(path), metadata=meta)


def test_a_stored_train_config_follows_the_same_policy() -> None:
    from moshivis_lab.config import from_stored
    from moshivis_lab.train.adapters import TrainConfig

    d = json.loads(json.dumps(dataclasses.asdict(TrainConfig.smoke())))  # as train_report stores it
    assert from_stored(TrainConfig, d, "r.json") == TrainConfig.smoke()
    d["mix"]["future_mix_knob"] = 0.5
    with pytest.warns(UserWarning, match=r"r\.json \[mix\]: dropped unknown MixConfig field"):
        assert from_stored(TrainConfig, d, "r.json") == TrainConfig.smoke()
    with pytest.raises(ValueError, match=r"r\.json: .*TrainConfig\.steps"):
        from_stored(TrainConfig, {**d, "mix": {}, "steps": "many"}, "r.json")


NESTED_CONFIG_CASES: tuple[tuple[str, Any, str], ...] = (
    ("MoshiVisConfig(lm='tiny')", lambda: MoshiVisConfig(lm="tiny"), r"^MoshiVisConfig\.lm: must be a LMConfig"),
    ("MoshiVisConfig(xa=3)", lambda: MoshiVisConfig(xa=3), r"^MoshiVisConfig\.xa: must be a XAConfig"),
    ("LabConfig(codec='tiny')", lambda: LabConfig(codec="tiny"), r"^LabConfig\.codec: must be a CodecConfig"),
    ("LabConfig(world=None)", lambda: LabConfig(world=None), r"^LabConfig\.world: must be a WorldConfig"),
    ("LabConfig(tokenizer=1000)", lambda: LabConfig(tokenizer=1000), r"^LabConfig\.tokenizer: must be a"),
    ("LabConfig(data_dir=None)", lambda: LabConfig(data_dir=None), r"^LabConfig\.data_dir: must be a path"),
    ("LabConfig(data_dir=3)", lambda: LabConfig(data_dir=3), r"^LabConfig\.data_dir: must be a path"),
    ("LabConfig(world={'sed': 1})", lambda: LabConfig(world={"sed": 1}), r"unknown WorldConfig field\(s\) \['sed'\]"),
    ("heldout_pairs=()", lambda: WorldConfig(heldout_pairs=()), r"heldout_pairs: the held-out images are built around"),
    ("heldout_pairs=(('red',),)", lambda: WorldConfig(heldout_pairs=(("red",),)), r"heldout_pairs: must be \(colour, shape\) pairs"),
    ("heldout_pairs=('red', 'star')", lambda: WorldConfig(heldout_pairs=("red", "star")), r"heldout_pairs: must be \(colour, shape\) pairs"),
    ("heldout_pairs unknown shape", lambda: WorldConfig(heldout_pairs=(("red", "dragon"),)), r"are not \(colour, shape\) pairs of the world"),
    ("heldout_pairs unknown colour", lambda: WorldConfig(heldout_pairs=(("teal", "star"),)), r"are not \(colour, shape\) pairs of the world"),
)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "make", "msg"), NESTED_CONFIG_CASES, ids=[c[0] for c in NESTED_CONFIG_CASES]
)
def test_nested_config_fields_are_checked_like_scalars(name, make, msg) -> None:
    with pytest.raises(ValueError, match=msg):
        make()


def test_nested_configs_take_their_dict_form() -> None:
    lab = LabConfig(world={"seed": 3}, codec={}, data_dir="somewhere")
    assert lab.world == WorldConfig(seed=3) and lab.codec == CodecConfig()
    assert lab.data_dir == Path("somewhere")
    assert WorldConfig(heldout_pairs=(), n_heldout_images=0).heldout_pairs == ()
    assert WorldConfig(heldout_pairs=[["red", "star"]]).heldout_pairs == [["red", "star"]]


# =============================================================================== checkpoints

LM_CFG = dataclasses.replace(
    LMConfig.tiny(), dim=32, num_layers=2, num_heads=2, text_card=64, card=32, context=16,
    depformer_dim=16, depformer_num_layers=1, depformer_num_heads=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def lm_and_codec() -> tuple[MoshiLM, Any]:
    torch.manual_seed(0)
    fake = types.SimpleNamespace(
        sample_rate=SR, frame_rate=12.5, frame_size=1920, num_codebooks=8, cardinality=32
    )
    return MoshiLM(LM_CFG).eval(), fake


@pytest.fixture(scope="module")
def vis() -> MoshiVis:
    torch.manual_seed(0)
    return MoshiVis(MoshiVisConfig.tiny(LM_CFG, image_dim=8)).eval()


def _corrupt(path: Path, out: Path, key: str, value: float) -> Path:
    state = load_file(path)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    save_file(state, out)
    return out


def _pickle(model: torch.nn.Module, out: Path) -> Path:
    torch.save(model.state_dict(), out)
    return out


# (name, maker(good_path, dir) -> path, error, regex): each refused by load_moshi / load_weights.
LM_CHECKPOINT_CASES: tuple[tuple[str, Any, type, str], ...] = (
    (
        "missing file",
        lambda g, d: d / "absent.safetensors",
        FileNotFoundError,
        "no checkpoint file",
    ),
    ("directory", lambda g, d: d, FileNotFoundError, r"is a directory; pass the checkpoint file"),
    ("empty file", lambda g, d: _write(d / "e.safetensors", b""), ValueError, "not a readable"),
    (
        "truncated",
        lambda g, d: _write(d / "t.safetensors", g.read_bytes()[: g.stat().st_size // 2]),
        ValueError,
        "not a readable safetensors",
    ),
    ("text file", lambda g, d: _write(d / "n.safetensors", b"hello"), ValueError, "not a readable"),
    (
        "NaN weight",
        lambda g, d: _corrupt(g, d / "nan.safetensors", "text_linear.weight", float("nan")),
        ValueError,
        r"1 tensors holding NaN or inf: text_linear\.weight .* diverged",
    ),
    (
        "inf weight",
        lambda g, d: _corrupt(g, d / "inf.safetensors", "out_norm.alpha", float("-inf")),
        ValueError,
        r"NaN or inf: out_norm\.alpha",
    ),
)


@pytest.mark.parametrize(
    ("name", "make", "err", "msg"), LM_CHECKPOINT_CASES, ids=[c[0] for c in LM_CHECKPOINT_CASES]
)
def test_bad_lm_checkpoints_are_refused_and_load_nothing(
    lm_and_codec, name, make, err, msg, tmp_path
):
    model, _ = lm_and_codec
    good = save_moshi(model, tmp_path / "good.safetensors")
    path = make(good, tmp_path)
    with pytest.raises(err, match=msg):
        load_moshi(path, LM_CFG)
    target = MoshiLM(LM_CFG)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(err, match=msg):
        load_weights(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


@_property("checkpoints")
@given(data=st.data())
def test_any_set_of_missing_and_extra_keys_is_listed(lm_and_codec, tmp_path_factory, data) -> None:
    model, _ = lm_and_codec
    d = tmp_path_factory.mktemp("keys")
    state = load_file(save_moshi(model, d / "good.safetensors"))
    names = sorted(state)
    drop = data.draw(st.sets(st.sampled_from(names), max_size=4))
    extra = data.draw(st.sets(st.from_regex(r"zz[a-z]{1,6}\.weight", fullmatch=True), max_size=3))
    reshape = data.draw(st.sets(st.sampled_from(sorted(set(names) - drop)), max_size=2))
    for k in drop:
        del state[k]
    for k in extra:
        state[k] = torch.zeros(2)
    for k in reshape:
        state[k] = torch.zeros(*state[k].shape, 1)
    save_file(state, d / "bad.safetensors")
    if not (drop or extra or reshape):
        assert load_moshi(d / "bad.safetensors", LM_CFG).cfg == LM_CFG
        return
    with pytest.raises(ValueError) as err:
        load_moshi(d / "bad.safetensors", LM_CFG)
    msg = str(err.value)
    assert "Nothing was loaded" in msg
    for what, keys in (("missing", drop), ("unexpected", extra), ("mis-shaped", reshape)):
        if keys:
            assert f"{len(keys)} {what}: " in msg
            assert all(k in msg for k in keys)  # at most 4 of each: all listed


VIS_CHECKPOINT_CASES: tuple[tuple[str, str], ...] = (
    ("NaN adapter weight", "NaN or inf"),
    ("directory", "is a directory"),
    ("full checkpoint as adapters", "unexpected"),
    ("adapters as full checkpoint", "missing"),
)


@pytest.mark.parametrize(
    ("name", "msg"), VIS_CHECKPOINT_CASES, ids=[c[0] for c in VIS_CHECKPOINT_CASES]
)
def test_bad_moshivis_checkpoints(vis, name, msg, tmp_path) -> None:
    full = save_moshivis(vis, tmp_path / "full.safetensors")
    adapters = save_adapters(vis, tmp_path / "adapters.safetensors")
    target = MoshiVis(vis.cfg).eval()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        if name == "NaN adapter weight":
            key = next(k for k in load_file(adapters) if "cross_attention" in k)
            load_adapters(target, _corrupt(adapters, tmp_path / "nan.safetensors", key, np.nan))
        elif name == "directory":
            load_moshivis(tmp_path, vis.cfg)
        elif name == "full checkpoint as adapters":
            load_adapters(target, full)
        else:
            load_moshivis_weights(target, adapters)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def _trainable(model: MoshiVis) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_load_trainable_lists_mismatches(vis, tmp_path) -> None:
    from moshivis_lab.train.adapters import load_trainable

    state = _trainable(vis)
    key = sorted(state)[0]
    state[key] = torch.zeros(*state[key].shape, 2)
    state["not.a.parameter"] = torch.zeros(1)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['not\.a\.parameter'\]"):
        load_trainable(vis, tmp_path / "bad.safetensors")


LOAD_TRAINABLE_CASES: tuple[tuple[str, Any, str], ...] = (
    (
        "missing file",
        lambda m, d: d / "absent.safetensors",
        "no such|not found|missing|no checkpoint file",
    ),
    ("pickle", lambda m, d: _pickle(m, d / "t.safetensors"), "pickle"),
    (
        "NaN",
        lambda m, d: _save_state(
            {k: torch.full_like(v, np.nan) for k, v in _trainable(m).items()}, d
        ),
        "NaN",
    ),
)


def _save_state(state: dict[str, torch.Tensor], d: Path) -> Path:
    save_file(state, d / "s.safetensors")
    return d / "s.safetensors"


@pytest.mark.parametrize(
    ("name", "make", "msg"),
    LOAD_TRAINABLE_CASES,
    ids=[c[0] for c in LOAD_TRAINABLE_CASES],
)
def test_load_trainable_refuses_bad_files_clearly(vis, name, make, msg, tmp_path) -> None:
    from moshivis_lab.train.adapters import load_trainable

    target = MoshiVis(vis.cfg).eval()
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        load_trainable(target, make(vis, tmp_path))


def _tiny_vision() -> ImageEncoder:
    torch.manual_seed(0)
    return ImageEncoder.from_config(
        VisionConfig(
            name="t", image_size=16, patch_size=8, hidden_size=16, num_layers=1, num_heads=2,
            intermediate_size=32,
        )
    )  # fmt: skip


VISION_CHECKPOINT_CASES: tuple[tuple[str, str], ...] = (
    ("NaN tower weight", r"holds NaN or inf .* Nothing was loaded"),
    ("pickle under a safetensors name", r"pickle checkpoint under a \.safetensors name is refused"),
    ("missing directory", r"vision_config\.json|No such file|no such"),
    ("mis-shaped tower", r"does not fit this vision tower .* mis-shaped"),
)


@pytest.mark.parametrize(
    ("name", "msg"), VISION_CHECKPOINT_CASES, ids=[c[0] for c in VISION_CHECKPOINT_CASES]
)
def test_bad_vision_checkpoints(name, msg, tmp_path) -> None:
    from moshivis_lab.vision.encoder import TOWER_FILE

    enc = _tiny_vision()
    d = enc.save(tmp_path / "enc")
    tower = d / TOWER_FILE
    if name == "NaN tower weight":
        _corrupt(tower, tower, sorted(load_file(tower))[0], float("nan"))
    elif name == "pickle under a safetensors name":
        _pickle(enc.model, tower)
    elif name == "missing directory":
        d = tmp_path / "absent"
    else:
        state = load_file(tower)
        k = sorted(state)[-1]
        state[k] = torch.zeros(*state[k].shape, 3)
        save_file(state, tower)
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        ImageEncoder.load(d)


CODEC_FILE_CASES: tuple[tuple[str, str], ...] = (
    ("no codec built", r"no fitted codec in .* run `moshivis-lab data --preset smoke` first"),
    ("config not JSON", r"is not valid JSON .* refit the codec"),
    ("tables edited", r"does not match .* \(interrupted save\?\); refit"),
    ("stored config invalid", r"the stored config is not valid \(CodecConfig\.frame_rate"),
)


@pytest.mark.parametrize(("name", "msg"), CODEC_FILE_CASES, ids=[c[0] for c in CODEC_FILE_CASES])
def test_bad_codec_directories(codec, name, msg, tmp_path) -> None:
    import json

    from moshivis_lab.audio.codecs import load_codec
    from moshivis_lab.audio.tiny_codec import CONFIG_FILE, TABLES_FILE

    cfg = LabConfig.smoke(tmp_path)
    if name != "no codec built":
        codec.save(cfg.codec_dir)
        meta = cfg.codec_dir / CONFIG_FILE
        if name == "config not JSON":
            meta.write_text("{ not json")
        elif name == "tables edited":
            (cfg.codec_dir / TABLES_FILE).write_bytes(
                b"x" + (cfg.codec_dir / TABLES_FILE).read_bytes()
            )
        else:
            m = json.loads(meta.read_text())
            m["config"]["frame_rate"] = "fast"
            meta.write_text(json.dumps(m))
    with pytest.raises((ValueError, FileNotFoundError), match=msg):
        load_codec(cfg)


# =============================================================================== CLI

# (args, regex in the output): every one exits with status 2 before anything is built or written.
_GE1 = r"(Input should be greater than or equal to 1|is not in the range x>=1)"  # typer / click
CLI_CASES: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("info", "--preset", "huge"),
        r"unknown preset 'huge'; choose one of \['moshika-vis', 'smoke', 'tiny'\]",
    ),
    (("data", "--preset", ""), r"unknown preset ''"),
    (("data", "--workers", "0"), r"'--workers': " + _GE1),
    (("data", "--stage", "everything"), r"unknown stage\(s\) \['everything'\]; choose from"),
    (("train", "--steps", "0"), r"'--steps': " + _GE1),
    (("train", "--steps", "ten"), r"'--steps': Input should be a valid integer"),
    (("train", "--minutes", "nan"), r"must be a number of minutes > 0, got nan"),
    (("train", "--minutes", "-5"), r"must be a number of minutes > 0"),
    (("train", "--p-audio", "1.5"), r"must be a probability in \[0, 1\], got 1.5"),
    (("train", "--image-tokens", "pixels"), r"must be one of encoder, oracle, got 'pixels'"),
    (("train", "--run", "../elsewhere"), r"not a run name"),
    (("train", "--run", ".hidden"), r"not a run name"),
    (("train", "--no-such-option"), r"No such option"),
    (("eval", "--per-type", "0"), r"'--per-type': " + _GE1),
    (("eval", "--run", "a/b"), r"not a run name"),
    (("ablate", "--steps", "-1"), r"'--steps': " + _GE1),
    (("pretrain-speech", "--n-dialogues", "0"), _GE1),
    (("pretrain-speech", "--steps", "1.5"), r"'--steps': Input should be a valid integer"),
    (("pretrain-vision", "--threads", "0"), r"'--threads': " + _GE1),
    (("reproduce", "--stage", "figures", "--stage", "bogus"), r"unknown stage\(s\) \['bogus'\]"),
    (("reproduce", "--rebuild-bases", "yes"), r"Got unexpected extra argument"),
    (("pretrain-bases", "--preset", "huge"), r"unknown preset 'huge'"),
    (("pretrain-bases", "--no-such-option"), r"No such option"),
    (("frobnicate",), r"No such command 'frobnicate'"),
)


def _invoke(args: list[str]):  # noqa: ANN202
    from typer.testing import CliRunner

    from moshivis_lab.cli import app

    return CliRunner().invoke(app, args)


@pytest.mark.parametrize(("args", "msg"), CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_bad_options_exit_2_and_write_nothing(args, msg, tmp_path) -> None:
    root = tmp_path / "data"
    extra = [] if args[0] == "frobnicate" else ["--data-dir", str(root)]
    result = _invoke([*args, *extra])
    assert result.exit_code == 2, result.output
    assert re.search(msg, _flat(result.output)), _flat(result.output)
    assert not root.exists()  # nothing built, nothing written


def test_cli_data_dir_must_be_a_directory(tmp_path) -> None:
    f = _write(tmp_path / "file.txt", b"x")
    result = _invoke(["info", "--data-dir", str(f)])
    assert result.exit_code == 2 and "is a file" in _flat(result.output)
    ok = _invoke(["info", "--preset", "smoke", "--data-dir", str(tmp_path / "d")])  # still works
    assert ok.exit_code == 0 and "nothing built yet" in ok.output


@_property("CLI")
@given(
    command=st.sampled_from(["train", "ablate", "pretrain-speech", "pretrain-vision"]),
    steps=st.integers(-(10**6), 0),
)
def test_cli_any_non_positive_step_count_is_refused(command, steps) -> None:
    result = _invoke([command, "--steps", str(steps)])
    assert result.exit_code == 2 and re.search(_GE1, _flat(result.output))


@_property("CLI")
@given(name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", max_size=10))
def test_cli_any_unknown_preset_is_refused(name) -> None:
    if name in PRESETS:
        return
    result = _invoke(["info", "--preset", name])
    assert result.exit_code == 2 and "unknown preset" in _flat(result.output)


# A refused value for every option of every command; a new option fails
# test_every_cli_option_refuses_a_bad_value until it is listed here. "FILE" is an existing file.
BAD_OPTION_VALUES: dict[str, tuple[str, ...]] = {
    "--preset": ("huge",),
    "--data-dir": ("FILE", "FILE/sub"),
    "--workers": ("0",),
    "--stage": ("bogus",),
    "--steps": ("0",),
    "--minutes": ("nan",),
    "--n-dialogues": ("0",),
    "--split": ("bogus", "train"),
    "--codebooks": ("9", "-1", "0,0", "a"),
    "--run": ("../x",),
    "--p-audio": ("1.5",),
    "--image-tokens": ("pixels",),
    "--per-type": ("0",),
    "--spoken-per-type": ("0",),
    "--threads": ("0",),
    "--figures-dir": ("FILE", "FILE/sub"),
    "--bases-root": ("FILE", "FILE/sub"),
    "--checkpoint": ("FILE", "missing_dir", "kyutai/not-cached"),
    "--image": ("", "missing.png"),
    "--prompt": ("",),
    "--audio": ("missing.wav",),
    "--gate": ("nan",),
    "--seconds": ("0",),
    "--seed": ("-1",),
    "--out": ("FILE", "FILE/sub"),
}


def _cli_options() -> list[tuple[str, str, bool]]:
    import typer.main

    from moshivis_lab.cli import app

    group = typer.main.get_command(app)
    return [
        (name, p.opts[0], bool(getattr(p, "is_flag", False)))
        for name, cmd in group.commands.items()
        for p in cmd.params
        if p.opts and p.opts[0].startswith("--")
    ]


CLI_OPTIONS = _cli_options()


@pytest.mark.parametrize(
    ("command", "option", "flag"), CLI_OPTIONS, ids=[f"{c} {o}" for c, o, _ in CLI_OPTIONS]
)
def test_every_cli_option_refuses_a_bad_value(command, option, flag, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    f = _write(tmp_path / "FILE", b"x")
    if flag:
        values = [f"{option}=yes"]  # a flag takes no value
    else:
        assert option in BAD_OPTION_VALUES, (
            f"`{command} {option}` has no refused value in BAD_OPTION_VALUES: validate it at parse "
            "time (a typer option constraint or callback) and list a bad value here"
        )
        values = [f"{option}={v.replace('FILE', str(f))}" for v in BAD_OPTION_VALUES[option]]
    for arg in values:
        extra = [] if option == "--data-dir" else ["--data-dir", str(tmp_path / "data")]
        result = _invoke([command, arg, *extra])
        out = _flat(result.output)
        assert result.exit_code == 2, (arg, out)
        assert option in out, (arg, out)  # the option is named
        assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"], arg  # nothing written


# =============================================================================== the count


def _n(cases: tuple) -> int:
    return len(cases)


# Inputs checked inline (not in a case tuple), per class.
INLINE_CASES: dict[str, int] = {
    # encoder: RGBA, a 16-bit file, a truncated file in a batch; image_tokens: an RGBA file;
    # viz: an RGB image and a uint8 array; the 20000x20000 header (preprocess + engine);
    # forward's uint8 and inf pixel_values; EXIF orientations 3 / 6 / 8 (three entry points
    # each); the 9600x9600 header
    "images": 3 + 1 + 2 + 1 + 2 + 3 * 3 + 1,
    # empty and silent arrays; 5 bad sample rates, an array without its rate, a 0 Hz target;
    # empty and silent wav files; ten minutes; full-scale wavs resampled (3 files x 4 consumers
    # + the array path), 9- and 16-channel wavs, the channel_axis advice (refused, two ways
    # followed, a bad axis)
    "audio": 2 + 7 + 2 + 1 + 3 * 5 + 2 + 4,
    # 4 non-strings, a missing tokenizer, 2 bad tokenizer files, 3 odd text_replies prompts, an
    # empty text_replies prompt; a lone surrogate to the TTS
    "text": 4 + 1 + 2 + 3 + 1 + 1,
    # nested / dict / sequence fields (test_nested_and_dict_configs); dict forms and an empty
    # heldout_pairs without held-out images (test_nested_configs_take_their_dict_form)
    "configs": 5 + 4,
    # load_trainable's mismatched keys; a stored TrainConfig: clean, unknown nested field, refused
    "checkpoints": 1 + 3,
    "CLI": 1,  # --data-dir naming a file
}
CASE_COUNTS: dict[str, int] = {
    "images": _n(IMAGE_MODE_CASES)
    + _n(IMAGE_FILE_CASES)
    + _n(VIZ_MODE_CASES)
    + _n(IMAGE_TENSOR_CASES),
    "audio": _n(AUDIO_CONVERTED_CASES)
    + _n(AUDIO_REFUSED_CASES)
    + _n(WAV_CASES)
    + _n(BAD_AUDIO_FILE_CASES),
    "text": _n(TEXT_CASES) + _n(PROMPT_CASES) + _n(SURROGATE_CASES),
    "configs": _n(CONFIG_TYPE_CASES) + _n(CONFIG_DOMAIN_CASES) + _n(NESTED_CONFIG_CASES),
    "checkpoints": _n(LM_CHECKPOINT_CASES)
    + _n(VIS_CHECKPOINT_CASES)
    + _n(LOAD_TRAINABLE_CASES)
    + _n(VISION_CHECKPOINT_CASES)
    + _n(CODEC_FILE_CASES)
    + 3 * _n(STORED_CONFIG_CASES),  # each through the LM, MoshiVis and vision readers
    "CLI": _n(CLI_CASES)
    + sum(1 if flag else len(BAD_OPTION_VALUES.get(o, ())) for _, o, flag in CLI_OPTIONS),
}
CASE_COUNTS = {k: v + INLINE_CASES[k] for k, v in CASE_COUNTS.items()}


def test_case_counts(capsys) -> None:
    lines = []
    for kind, n in CASE_COUNTS.items():
        props = _HYPOTHESIS_TESTS.get(kind, 0)
        lines.append(
            f"{kind:12s} {n:4d} listed bad inputs + {props} properties x {N_EXAMPLES} "
            f"hypothesis examples = {n + props * N_EXAMPLES}"
        )
    total = sum(CASE_COUNTS.values()) + sum(_HYPOTHESIS_TESTS.values()) * N_EXAMPLES
    with capsys.disabled():
        print("\nbad inputs per class:\n  " + "\n  ".join(lines) + f"\n  total {total}")
    assert all(CASE_COUNTS[k] >= 10 for k in CASE_COUNTS)
    assert set(_HYPOTHESIS_TESTS) == set(CASE_COUNTS)
