"""Kyutai's Mimi codec behind the lab's codec protocol, through transformers' ``MimiModel``.

Weights are read from a LOCAL directory in the Hugging Face ``kyutai/mimi`` layout
(``config.json`` + ``model.safetensors``) or from Kyutai's own file in the ``moshi`` layout
(``tokenizer-e351c8d8-checkpoint125.safetensors``, converted on load: ``mimi_moshi``); nothing
is downloaded. Moshi uses the first 8 of
Mimi's 32 codebooks (codebook 0 semantic, 1..7 acoustic), 2048 entries each, at 12.5 Hz.

Streaming:

- the encoder streams **natively**: transformers' ``MimiModel.encode(..., use_streaming=True,
  encoder_cache=..., padding_cache=...)`` carries the causal-conv padding cache and the encoder
  transformer's KV cache from call to call. Input is buffered to whole 80 ms frames, because the
  native path silently drops a partial frame. Codes equal batch ``encode`` exactly.
- the decoder is **hybrid**: transformers exposes a KV cache for the decoder transformer but no
  streaming state for the SEANet decoder's convolutions. The codebooks are looked up per frame,
  the upsampling transposed convolution is re-run on the last two frames, the decoder transformer
  runs one frame at a time on its native KV cache, and the SEANet decoder is re-run on a short
  window of transformer outputs longer than its (finite, causal) receptive field. The samples
  of each new frame therefore equal batch ``decode`` (up to float rounding).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moshivis_lab._compat import ensure_torchaudio_importable
from moshivis_lab.audio.io import to_mono_float
from moshivis_lab.audio.mimi_moshi import load_moshi_mimi
from moshivis_lab.audio.protocol import n_frames, prepare_input, validate_codes, validate_frame
from moshivis_lab.config import CodecConfig

MOSHI_NUM_CODEBOOKS = 8


def _weights_present(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def _check_checkpoint_dir(path: Path) -> dict[str, Any]:
    """Return the parsed ``config.json`` of a Mimi checkpoint directory, or raise a clear error."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such directory; download kyutai/mimi (config.json + model.safetensors) "
            "there first, e.g. `huggingface-cli download kyutai/mimi --local-dir <dir>`"
        )
    if not path.is_dir():
        raise ValueError(f"{path}: expected a directory holding config.json + model.safetensors")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path}: not a Mimi checkpoint (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from e
    if raw.get("model_type") != "mimi":
        raise ValueError(
            f"{path}: not a Mimi checkpoint (config.json has model_type={raw.get('model_type')!r}, "
            "expected 'mimi')"
        )
    if not _weights_present(path):
        raise ValueError(f"{path}: config.json is there but no weights (model.safetensors)")
    return raw


def _load_hf_dir(path: Path) -> Any:
    """A ``MimiModel`` from a Hugging Face kyutai/mimi directory, checked complete."""
    _check_checkpoint_dir(path)
    from transformers import MimiModel

    try:
        model, info = MimiModel.from_pretrained(
            str(path), local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot be loaded as a Mimi checkpoint ({e})") from e
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(info.get("mismatched_keys", ()))
    if missing or mismatched:
        bad = (missing + [str(m) for m in mismatched])[:5]
        raise ValueError(
            f"{path}: not a complete Mimi checkpoint: {len(missing)} weights missing and "
            f"{len(mismatched)} of the wrong shape (e.g. {bad}); re-download kyutai/mimi"
        )
    return model


def _seanet_lookback_steps(cfg: Any) -> int:
    """How many past latent steps (at the transformer's rate) the causal SEANet decoder reads."""
    look = float(cfg.kernel_size - 1)  # first conv, at the latent rate
    rate = 1
    for r in cfg.upsampling_ratios:
        look += 1.0  # ConvTranspose1d(kernel 2r, stride r): current and previous input step
        rate *= r
        for j in range(cfg.num_residual_layers):
            look += (cfg.residual_kernel_size - 1) * cfg.dilation_growth_rate**j / rate
    look += (cfg.last_kernel_size - 1) / rate
    return int(math.ceil(look))


class MimiStreamingEncoder:
    """Push audio chunks (codec rate), get codes for every whole frame; ``flush`` ends the stream."""

    def __init__(self, codec: MimiCodec) -> None:
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        """Forget all state and start a new stream."""
        self._buf = np.zeros(0, np.float32)
        self._enc_cache: Any = None
        self._pad_cache: Any = None

    def _encode_frames(self, wav: np.ndarray) -> np.ndarray:
        c = self.codec
        x = torch.from_numpy(wav).to(device=c.device, dtype=c.dtype)[None, None]
        with torch.inference_mode():
            out = c.model.encode(
                x,
                num_quantizers=c.num_codebooks,
                use_streaming=True,
                encoder_cache=self._enc_cache,
                padding_cache=self._pad_cache,
            )
        self._enc_cache, self._pad_cache = out.encoder_cache, out.padding_cache
        return out.audio_codes[0].to("cpu", torch.int64).numpy()

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Add mono samples at ``codec.sample_rate``; return codes [K, n_new] of the new whole frames."""
        a = to_mono_float(samples, name="streaming chunk")
        self._buf = np.concatenate([self._buf, a])
        fs = self.codec.frame_size
        n = len(self._buf) // fs
        if n == 0:
            return np.zeros((self.codec.num_codebooks, 0), np.int64)
        head, self._buf = self._buf[: n * fs], self._buf[n * fs :]
        return self._encode_frames(head)

    def flush(self) -> np.ndarray:
        """Zero-pad and encode the buffered partial frame (if any), then reset for a new stream."""
        fs = self.codec.frame_size
        if len(self._buf) == 0:
            codes = np.zeros((self.codec.num_codebooks, 0), np.int64)
        else:
            codes = self._encode_frames(np.pad(self._buf, (0, fs - len(self._buf))))
        self.reset()
        return codes


class MimiStreamingDecoder:
    """Decode one frame of codes [K] at a time into ``frame_size`` samples (see module docstring)."""

    def __init__(self, codec: MimiCodec, seanet_context_frames: int | None = None) -> None:
        self.codec = codec
        cfg = codec.model.config
        dec = codec.model.decoder
        # transformers >= 5 splits MimiModel into encoder/decoder halves; 4.x kept them flat.
        if hasattr(dec, "decoder_seanet"):
            self._upsample, self._transformer, self._seanet = (
                dec.upsample,
                dec.decoder_transformer,
                dec.decoder_seanet,
            )
        else:  # pragma: no cover - transformers 4.x layout
            m = codec.model
            self._upsample, self._transformer, self._seanet = m.upsample, m.decoder_transformer, dec
        params = inspect.signature(self._transformer.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._stride = 1 if self._upsample is None else int(cfg.latent_stride)
        if seanet_context_frames is None:
            look = _seanet_lookback_steps(cfg)
            seanet_context_frames = 1 + math.ceil((look + 2) / self._stride)
        if seanet_context_frames < 1:
            raise ValueError(f"seanet_context_frames must be >= 1, got {seanet_context_frames}")
        self.seanet_context_frames = int(seanet_context_frames)
        self.reset()

    def reset(self) -> None:
        """Forget all state and start a new stream."""
        from transformers import DynamicCache

        self._cache = DynamicCache(config=self._transformer.config)
        self._prev_latent: torch.Tensor | None = None
        self._hist: torch.Tensor | None = None  # transformer outputs [1, C, steps], bounded

    def step(self, codes_frame: np.ndarray) -> np.ndarray:
        """Decode one frame of codes [K] and return its ``frame_size`` float32 samples."""
        c = self.codec
        codes = validate_frame(codes_frame, c.num_codebooks, c.cardinality)
        t = torch.from_numpy(codes).to(c.device)[None, :, None]  # [1, K, 1]
        with torch.inference_mode():
            latent = c.model.quantizer.decode(t).to(c.dtype)  # [1, C, 1]
            if self._upsample is None:
                up = latent
            else:
                pair = (
                    latent
                    if self._prev_latent is None
                    else torch.cat([self._prev_latent, latent], -1)
                )
                up = self._upsample(pair)[..., -self._stride :]
            self._prev_latent = latent
            kw = {self._cache_kw: self._cache, "use_cache": True}
            h = self._transformer(up.transpose(1, 2), **kw).last_hidden_state.transpose(1, 2)
            hist = h if self._hist is None else torch.cat([self._hist, h], -1)
            self._hist = hist[..., -self.seanet_context_frames * self._stride :]
            wav = self._seanet(self._hist)[0, 0, -c.frame_size :]
        return wav.float().cpu().numpy().astype(np.float32)


class MimiCodec:
    """Mimi (transformers ``MimiModel``) with the lab's codec protocol: wav <-> codes [K, T]."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        num_codebooks: int = MOSHI_NUM_CODEBOOKS,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        path = Path(path).expanduser()
        ensure_torchaudio_importable()
        if path.is_file():  # Kyutai's own file, in the moshi package's layout
            model = load_moshi_mimi(path)
        else:
            model = _load_hf_dir(path)
        cfg = model.config
        if not 1 <= num_codebooks <= cfg.num_quantizers:
            raise ValueError(
                f"num_codebooks must be in [1, {cfg.num_quantizers}] for this checkpoint, got {num_codebooks}"
            )
        if num_codebooks < cfg.num_semantic_quantizers:
            raise ValueError(
                f"num_codebooks must be >= the {cfg.num_semantic_quantizers} semantic codebook(s)"
            )
        self.path = path
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.sample_rate: int = int(cfg.sampling_rate)
        self.frame_rate: float = float(cfg.frame_rate)
        fs = self.sample_rate / self.frame_rate
        if not fs.is_integer():
            raise ValueError(
                f"{path}: sample_rate / frame_rate = {fs} is not a whole number of samples"
            )
        self.frame_size: int = int(fs)
        self.num_codebooks: int = int(num_codebooks)
        self.cardinality: int = int(cfg.codebook_size)

    @classmethod
    def from_config(
        cls,
        config: CodecConfig,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> MimiCodec:
        """Load the checkpoint at ``config.mimi_path`` and check it agrees with ``config``."""
        if config.kind != "mimi" or config.mimi_path is None:
            raise ValueError(
                f"CodecConfig.kind must be 'mimi' with a mimi_path, got kind={config.kind!r}"
            )
        codec = cls(
            config.mimi_path, num_codebooks=config.num_codebooks, device=device, dtype=dtype
        )
        for name in ("sample_rate", "frame_rate", "cardinality"):
            want, got = getattr(config, name), getattr(codec, name)
            if want != got:
                raise ValueError(
                    f"CodecConfig.{name}={want!r} but the checkpoint at {config.mimi_path} has {got!r}"
                )
        return codec

    def __repr__(self) -> str:
        return (
            f"MimiCodec(path={str(self.path)!r}, K={self.num_codebooks}, card={self.cardinality}, "
            f"{self.sample_rate} Hz, {self.frame_rate} fps, device={self.device}, dtype={self.dtype})"
        )

    def num_frames(self, num_samples: int) -> int:
        """Frames ``encode`` gives for ``num_samples`` samples at the codec rate (ceil)."""
        return n_frames(int(num_samples), self.frame_size)

    def encode(self, wav: np.ndarray, sample_rate: int | None = None) -> np.ndarray:
        """Codes int64 [K, ceil(N / frame_size)]; a partial last frame is zero-padded."""
        a = prepare_input(wav, sample_rate, self.sample_rate)
        a = np.pad(a, (0, self.num_frames(a.size) * self.frame_size - a.size))
        x = torch.from_numpy(a).to(device=self.device, dtype=self.dtype)[None, None]
        with torch.inference_mode():
            codes = self.model.encode(x, num_quantizers=self.num_codebooks).audio_codes
        return codes[0].to("cpu", torch.int64).numpy()

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Float32 mono waveform of T * frame_size samples from codes [K, T]."""
        c = validate_codes(codes, self.num_codebooks, self.cardinality)
        if c.shape[1] == 0:
            return np.zeros(0, np.float32)
        t = torch.from_numpy(c).to(self.device)[None]
        with torch.inference_mode():
            wav = self.model.decode(t).audio_values[0, 0]
        return wav[: c.shape[1] * self.frame_size].float().cpu().numpy().astype(np.float32)

    def streaming_encoder(self) -> MimiStreamingEncoder:
        """A native streaming encoder (see ``MimiStreamingEncoder``)."""
        return MimiStreamingEncoder(self)

    def streaming_decoder(self, seanet_context_frames: int | None = None) -> MimiStreamingDecoder:
        """A frame-by-frame decoder whose output matches batch ``decode`` (see module docstring)."""
        return MimiStreamingDecoder(self, seanet_context_frames)
