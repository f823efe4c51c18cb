"""MimiCodec on a tiny random Mimi checkpoint written in the real (kyutai/mimi) layout."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

from moshivis_lab._compat import ensure_torchaudio_importable  # noqa: E402
from moshivis_lab.audio.mimi import MimiCodec  # noqa: E402
from moshivis_lab.audio.protocol import Codec, StreamingDecoder, StreamingEncoder  # noqa: E402
from moshivis_lab.config import CodecConfig  # noqa: E402

SR = 24000
FS = 1920


def _write_tiny_mimi(path: Path) -> Path:
    """Save a tiny random MimiModel (real 24 kHz / 12.5 Hz, 2048-entry codebooks) to ``path``."""
    ensure_torchaudio_importable()
    from transformers import MimiConfig, MimiModel

    cfg = MimiConfig(
        hidden_size=32,
        num_filters=4,
        codebook_size=2048,
        codebook_dim=16,
        vector_quantization_hidden_dimension=16,
        num_quantizers=10,  # more than the 8 Moshi uses, like the real 32
        upsample_groups=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        sliding_window=6,  # tiny, so streaming runs past the attention window
    )
    torch.manual_seed(0)
    model = MimiModel(cfg).eval()
    # A fresh MimiModel has all-zero codebooks (every code would be 0): give them centroids.
    g = torch.Generator().manual_seed(1)
    for mod in model.modules():
        if type(mod).__name__ == "MimiEuclideanCodebook":
            with torch.no_grad():
                mod.embed_sum.copy_(torch.randn(mod.embed_sum.shape, generator=g))
                mod.cluster_usage.fill_(1.0)
                mod.initialized.fill_(1.0)
            mod._embed = None
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tiny_mimi(tmp_path_factory.mktemp("mimi") / "tiny_mimi")


@pytest.fixture(scope="module")
def codec(ckpt: Path) -> MimiCodec:
    return MimiCodec(ckpt)


def _noise(seconds: float, seed: int = 0, sr: int = SR) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def test_checkpoint_is_in_kyutai_layout(ckpt: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "encoder.layers.0.conv.weight" in keys
    assert "downsample.conv.weight" in keys and "upsample.conv.weight" in keys
    assert any(k.startswith("encoder_transformer.layers.0.") for k in keys)
    assert "quantizer.semantic_residual_vector_quantizer.layers.0.codebook.embed_sum" in keys
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "mimi"


def test_attributes(codec: MimiCodec) -> None:
    assert isinstance(codec, Codec)
    assert isinstance(codec.streaming_encoder(), StreamingEncoder)
    assert isinstance(codec.streaming_decoder(), StreamingDecoder)
    assert codec.sample_rate == SR
    assert codec.frame_rate == 12.5
    assert codec.frame_size == FS
    assert codec.num_codebooks == 8
    assert codec.cardinality == 2048
    assert "MimiCodec" in repr(codec)


@pytest.mark.parametrize("n", [1, FS - 1, FS, FS + 1, SR, 2 * SR + 7])
def test_encode_decode_shapes(codec: MimiCodec, n: int) -> None:
    codes = codec.encode(_noise(2.1)[:n])
    t = -(-n // FS)
    assert codes.shape == (8, t) and codes.dtype == np.int64
    assert t == codec.num_frames(n)
    assert codes.min() >= 0 and codes.max() < codec.cardinality
    wav = codec.decode(codes)
    assert wav.dtype == np.float32 and wav.shape == (t * FS,)
    assert np.all(np.isfinite(wav))


def test_codes_vary(codec: MimiCodec) -> None:
    codes = codec.encode(_noise(2.0))
    assert len(np.unique(codes)) > 10
    for k in range(codes.shape[0]):
        assert len(np.unique(codes[k])) > 1, f"codebook {k} is constant"


def test_from_config(ckpt: Path, codec: MimiCodec) -> None:
    cfg = CodecConfig.mimi(ckpt)
    c2 = MimiCodec.from_config(cfg)
    x = _noise(0.5)
    np.testing.assert_array_equal(c2.encode(x), codec.encode(x))
    with pytest.raises(ValueError, match="cardinality"):
        MimiCodec.from_config(dataclasses.replace(cfg, cardinality=1024))
    with pytest.raises(ValueError, match="kind"):
        MimiCodec.from_config(CodecConfig.tiny())
    assert MimiCodec.from_config(dataclasses.replace(cfg, num_codebooks=10)).num_codebooks == 10


def test_num_codebooks_bounds(ckpt: Path) -> None:
    with pytest.raises(ValueError, match="num_codebooks"):
        MimiCodec(ckpt, num_codebooks=11)
    with pytest.raises(ValueError, match="num_codebooks"):
        MimiCodec(ckpt, num_codebooks=0)


def test_input_formats(codec: MimiCodec) -> None:
    x = _noise(1.0)
    ref = codec.encode(x)
    np.testing.assert_array_equal(codec.encode(np.stack([x, x])), ref)  # stereo [2, N]
    np.testing.assert_array_equal(codec.encode(np.stack([x, x], axis=1)), ref)  # [N, 2]
    pcm = (x * 32767).astype(np.int16)
    assert codec.encode(pcm).shape == ref.shape
    x16 = _noise(1.0, sr=16000)
    assert codec.encode(x16, sample_rate=16000).shape == (8, -(-SR // FS))  # resampled to 24 kHz
    assert codec.encode(_noise(1.0, sr=48000), 48000).shape == (8, 13)


def test_bad_inputs(codec: MimiCodec) -> None:
    x = _noise(0.5)
    x[10] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(x)
    with pytest.raises(ValueError, match="empty"):
        codec.encode(np.zeros(0, np.float32))
    with pytest.raises(ValueError):
        codec.encode(np.zeros((1, 2, 100), np.float32))
    with pytest.raises(ValueError, match="sample_rate"):
        codec.encode(_noise(0.5), sample_rate=0)


def test_bad_codes(codec: MimiCodec) -> None:
    good = codec.encode(_noise(0.5))
    with pytest.raises(ValueError, match="shape"):
        codec.decode(good[:7])
    with pytest.raises(ValueError, match="shape"):
        codec.decode(good[0])
    with pytest.raises(ValueError, match="integer"):
        codec.decode(good.astype(np.float32))
    bad = good.copy()
    bad[0, 0] = 2048
    with pytest.raises(ValueError, match="lie in"):
        codec.decode(bad)
    bad[0, 0] = -1  # the LM's zero token has no audio
    with pytest.raises(ValueError, match="lie in"):
        codec.decode(bad)
    assert codec.decode(np.zeros((8, 0), np.int64)).shape == (0,)


def test_streaming_encoder_matches_batch(codec: MimiCodec) -> None:
    x = _noise(2.5, seed=3)
    ref = codec.encode(x)
    enc = codec.streaming_encoder()
    rng = np.random.default_rng(0)
    parts, i = [], 0
    while i < len(x):
        n = int(rng.integers(1, 3 * FS))
        out = enc.push(x[i : i + n])
        assert out.shape[0] == 8 and out.dtype == np.int64
        parts.append(out)
        i += n
    parts.append(enc.flush())
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), ref)
    # a chunk shorter than a frame gives no codes yet; flush then gives the padded frame
    assert enc.push(x[:100]).shape == (8, 0)
    np.testing.assert_array_equal(enc.flush(), codec.encode(x[:100]))
    assert enc.flush().shape == (8, 0)


def test_streaming_decoder_matches_batch(codec: MimiCodec) -> None:
    codes = codec.encode(_noise(2.0, seed=5))  # 25 frames, past the 6-step attention window
    ref = codec.decode(codes)
    dec = codec.streaming_decoder()
    out = [dec.step(codes[:, t]) for t in range(codes.shape[1])]
    assert all(o.shape == (FS,) and o.dtype == np.float32 for o in out)
    got = np.concatenate(out)
    scale = float(np.abs(ref).max())
    assert np.abs(got - ref).max() <= 1e-4 * max(scale, 1.0)
    dec.reset()
    np.testing.assert_allclose(dec.step(codes[:, 0]), ref[:FS], atol=1e-4 * max(scale, 1.0))
    with pytest.raises(ValueError, match="shape"):
        dec.step(codes[:7, 0])
    with pytest.raises(ValueError, match="lie in"):
        dec.step(np.full(8, 5000))


def test_missing_and_wrong_dirs(tmp_path: Path, ckpt: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such directory"):
        MimiCodec(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a Mimi checkpoint"):
        MimiCodec(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type"):
        MimiCodec(other)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(ckpt / "config.json", no_weights / "config.json")
    with pytest.raises(ValueError, match="no weights"):
        MimiCodec(no_weights)


def test_incomplete_checkpoint(tmp_path: Path, ckpt: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(ckpt / "config.json", broken / "config.json")
    sd = load_file(str(ckpt / "model.safetensors"))
    save_file(
        {k: v for k, v in sd.items() if not k.startswith("decoder.")},
        str(broken / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match="missing"):
        MimiCodec(broken)
