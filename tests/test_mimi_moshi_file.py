"""Mimi read from the ``moshi`` package's own file layout (Kyutai's
``tokenizer-e351c8d8-checkpoint125.safetensors``) computes what ``moshi``'s Mimi computes.

A tiny random Mimi is built and written by the ``moshi`` package itself (a test-only reference,
skipped when it is not importable: `pip install --no-deps moshi==0.2.13`).
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi is imported

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

try:
    from moshi.models.loaders import _mimi_config, get_mimi
except Exception as e:  # noqa: BLE001 - any import failure means: no reference here
    pytest.skip(f"the reference package `moshi` is not importable ({e})", allow_module_level=True)

from moshivis_lab.audio.mimi import MimiCodec
from moshivis_lab.audio.mimi_moshi import MOSHI_MIMI_FILE, is_moshi_mimi_file, load_moshi_mimi

pytestmark = pytest.mark.usefixtures("one_torch_thread")
K = 4  # codebooks the LM would use


def tiny_moshi_mimi(seed: int = 0):  # noqa: ANN201 (a moshi MimiModel)
    """moshi's Mimi at toy widths (64-wide, one 64-wide head), random, codebooks non-trivial."""
    cfg = copy.deepcopy(_mimi_config)
    cfg["seanet"].update(dimension=64, n_filters=4)
    cfg["quantizer"].update(dimension=16, n_q=6, bins=32, input_dimension=64, output_dimension=64)
    cfg["transformer"].update(
        d_model=64, num_heads=1, num_layers=2, dim_feedforward=96, input_dimension=64,
        output_dimensions=[64],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = get_mimi(None, cfg, num_codebooks=K).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("embedding_sum"):
                t.copy_(torch.randn_like(t))
            elif name.endswith("cluster_usage"):
                t.copy_(torch.rand_like(t) + 0.5)
            elif name.endswith("_initialized"):
                t.fill_(1)
            elif name.endswith("scale"):
                t.copy_(torch.rand_like(t) * 0.5 + 0.1)  # layer scales off their 0.01 init
    return model


def write_released(model, path, old_names: bool) -> None:  # noqa: ANN001
    """The state dict as moshi writes it; ``old_names``: the released file's attention names."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if old_names:
        state = {
            k.replace("self_attn.in_projs.0.weight", "self_attn.in_proj_weight").replace(
                "self_attn.out_projs.0.", "self_attn.out_proj."
            ): v
            for k, v in state.items()
        }
    save_file(state, str(path))


def speech_like(seconds: float = 1.04, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(24000 * seconds)) / 24000
    wav = 0.3 * np.sin(
        2 * np.pi * 180 * t * (1 + 0.2 * np.sin(3 * t))
    ) + 0.05 * rng.standard_normal(t.size)
    return wav.astype(np.float32)


@pytest.mark.parametrize("old_names", [True, False])
def test_codes_and_audio_equal_moshis(tmp_path, old_names: bool) -> None:
    ref = tiny_moshi_mimi()
    path = tmp_path / MOSHI_MIMI_FILE
    write_released(ref, path, old_names)
    assert is_moshi_mimi_file(path)
    codec = MimiCodec(path, num_codebooks=K)
    assert (codec.sample_rate, codec.frame_rate, codec.cardinality) == (24000, 12.5, 32)
    wav = speech_like()
    with torch.no_grad():
        want = ref.encode(torch.from_numpy(wav)[None, None])[0].numpy()
    got = codec.encode(wav)
    assert got.shape == want.shape == (K, 13)
    assert np.array_equal(got, want)
    with torch.no_grad():
        want_wav = ref.decode(torch.from_numpy(want)[None])[0, 0].numpy()
    got_wav = codec.decode(want)
    assert got_wav.shape == want_wav.shape
    assert np.abs(got_wav - want_wav).max() < 1e-4
    assert np.abs(want_wav).max() > 1e-3  # the decoder does something


def test_streaming_is_exact(tmp_path) -> None:
    """The lab's streaming encoder gives moshi's codes; its streaming decoder moshi's samples."""
    ref = tiny_moshi_mimi(seed=1)
    path = tmp_path / MOSHI_MIMI_FILE
    write_released(ref, path, old_names=True)
    codec = MimiCodec(path, num_codebooks=K)
    wav = speech_like(seed=1)
    enc = codec.streaming_encoder()
    chunks = [enc.push(wav[i : i + 700]) for i in range(0, wav.size, 700)]
    streamed = np.concatenate([c for c in chunks if c.size] + [enc.flush()], axis=1)
    with torch.no_grad():
        want = ref.encode(torch.from_numpy(wav)[None, None])[0].numpy()
        with ref.streaming(1):
            frames = [
                ref.decode(torch.from_numpy(want[:, t : t + 1])[None]) for t in range(want.shape[1])
            ]
    assert np.array_equal(streamed, want)
    want_wav = torch.cat(frames, dim=-1)[0, 0].numpy()
    dec = codec.streaming_decoder()
    got_wav = np.concatenate([dec.step(want[:, t]) for t in range(want.shape[1])])
    assert np.abs(got_wav - want_wav).max() < 1e-4


def test_not_a_moshi_file_says_what_to_give(tmp_path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    assert not is_moshi_mimi_file(path)
    with pytest.raises(ValueError, match="moshi layout.*tokenizer-e351c8d8"):
        load_moshi_mimi(path)
    ref = tiny_moshi_mimi()
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    del state["decoder.model.0.conv.conv.bias"]
    save_file(state, str(path))
    with pytest.raises(ValueError, match="1 missing: decoder"):
        load_moshi_mimi(path)


def test_writing_the_moshi_layout_round_trips(tmp_path) -> None:
    """``to_moshi_state`` (how the tiny released directory is written) is what moshi reads and
    what the lab reads back, bit for bit."""
    ref = tiny_moshi_mimi(seed=2)
    path = tmp_path / MOSHI_MIMI_FILE
    write_released(ref, path, old_names=True)
    hf = load_moshi_mimi(path)
    from moshivis_lab.audio.mimi_moshi import to_moshi_state

    state = to_moshi_state(hf)
    from safetensors.torch import load_file

    original = load_file(str(path))
    assert set(state) == set(original)
    assert all(torch.equal(state[k], original[k].float()) for k in state)
