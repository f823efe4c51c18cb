"""Real time: the tiny full-duplex loop with codec encode and decode, batch 1, on CPU.

``converse`` (``moshivis_lab.model.generate``) runs the whole exchange: the user's audio goes
through the codec's streaming encoder frame by frame (80 ms), each frame through one LM step
cross-attending to the image's keys/values (computed once, before the loop), Moshi's codes
through the streaming decoder. ``x_realtime = audio seconds / wall seconds`` (target: >= 5 on 2
cores). The parts are timed on their own as well: encoder and decoder per frame, LM step.

Weights: the trained tiny adapters (``data/tiny/adapters/main``) when built, else random
weights of the same shapes (the cost is the same).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import interleaved, scaled, stats

SENTENCES = (
    "Hello there, what can you see in the picture?",
    "Is there a red star at the top left, or a small blue circle in the centre?",
    "Tell me how many shapes you can count, and which colour is the largest one.",
)


def _pieces(cfg: Any) -> dict[str, Any]:
    """Codec, tokenizer, MoshiVis and the image keys/values of one world image."""
    from moshivis_lab.audio.codecs import load_codec
    from moshivis_lab.world.tokenizer import TextTokenizer

    codec, codec_note = _codec(cfg, load_codec)
    tokenizer = TextTokenizer.load(cfg.tokenizer_path)
    weights = "trained (adapters run main)"
    try:
        from moshivis_lab.train.adapters import load_trained

        model = load_trained(cfg, "main")
        from moshivis_lab.vision.pretrain import load_vision_encoder

        encoder = load_vision_encoder(cfg)
    except (FileNotFoundError, OSError, KeyError, ValueError):
        from moshivis_lab.config import LMConfig, MoshiVisConfig
        from moshivis_lab.model.moshivis import MoshiVis
        from moshivis_lab.vision import ImageEncoder, VisionConfig

        torch.manual_seed(0)
        encoder = ImageEncoder.from_config(VisionConfig.tiny())
        lm_cfg = LMConfig.tiny(text_card=tokenizer.vocab_size, card=int(codec.cardinality))
        model = MoshiVis(MoshiVisConfig.tiny(lm_cfg, image_dim=encoder.hidden_size))
        weights = "random (no trained adapters found)"
    model.eval()
    from PIL import Image

    rng = np.random.default_rng(0)
    size = cfg.world.image_size
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    return {
        "codec": codec,
        "tokenizer": tokenizer,
        "model": model,
        "encoder": encoder,
        "image": image,
        "weights": weights,
        "codec_note": codec_note,
    }


def _codec(cfg: Any, load_codec: Any) -> tuple[Any, str]:
    """The fitted tiny codec, else one with random tables of the same shapes (same cost)."""
    try:
        return load_codec(cfg), "fitted"
    except (FileNotFoundError, ValueError) as e:
        from moshivis_lab.audio.tiny_codec import TinyCodec

        rng = np.random.default_rng(0)
        shapes = TinyCodec.table_shapes(cfg.codec)
        tables = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        return TinyCodec(cfg.codec, tables), f"random tables (fitted codec unusable: {e})"


def bench(cfg: Any, quick: bool = False, repeats: int = 5) -> dict[str, Any]:
    """``x_realtime`` of ``converse`` with an image (and without), plus the parts' costs."""
    from moshivis_lab.model.generate import converse
    from moshivis_lab.world.speech import ASSISTANT_VOICE, synthesize

    try:
        p = _pieces(cfg)
    except FileNotFoundError as e:
        return {"skipped": str(e)}
    codec, tok, model, encoder = p["codec"], p["tokenizer"], p["model"], p["encoder"]
    sr = int(codec.sample_rate)
    sentences = SENTENCES[:1] if quick else SENTENCES
    wav = np.concatenate([synthesize(s, ASSISTANT_VOICE, sr).wav for s in sentences])
    if quick:
        wav = wav[: sr // 2]
    extra = 0.16 if quick else 2.0
    repeats = 1 if quick else repeats

    def session() -> Any:  # what happens once per image: encoder + image K/V
        with torch.inference_mode():
            return model.encode_image(encoder.encode([p["image"]]))

    def talk(with_image: bool):
        def run() -> float:
            t0 = time.perf_counter()
            kv = session() if with_image else None
            conv = converse(model.lm, codec, tok, wav, sr, extra_seconds=extra, image_kv=kv)
            dt = time.perf_counter() - t0
            run.seconds = conv.wav.size / sr  # type: ignore[attr-defined]
            return dt

        return run

    cases = {"with_image": talk(True), "no_image": talk(False)}
    t = interleaved(cases, repeats, warmup=0 if quick else 1)
    seconds = cases["with_image"].seconds  # type: ignore[attr-defined]
    out: dict[str, Any] = {
        "weights": p["weights"],
        "codec": p["codec_note"],
        "audio_seconds": round(seconds, 2),
        "frames": int(round(seconds * float(codec.frame_rate))),
        "x_realtime": {k: stats([seconds / x for x in v]) for k, v in t.items()},
        "target": ">= 5x real time (80 ms of audio per step)",
    }
    out["parts_ms"] = _parts(p, wav, quick)
    return out


def _parts(p: dict[str, Any], wav: np.ndarray, quick: bool) -> dict[str, Any]:
    """Per-frame ms of each part of the loop, and the once-per-image session start."""
    codec, model, encoder = p["codec"], p["model"], p["encoder"]
    fs = int(codec.frame_size)
    n = wav.size // fs
    reps = 2 if quick else 5

    def enc() -> float:
        e = codec.streaming_encoder()
        t0 = time.perf_counter()
        for i in range(n):
            e.push(wav[i * fs : (i + 1) * fs])
        return (time.perf_counter() - t0) / n

    codes = np.asarray(codec.encode(wav), np.int64)

    def dec() -> float:
        d = codec.streaming_decoder()
        t0 = time.perf_counter()
        for i in range(codes.shape[1]):
            d.step(codes[:, i])
        return (time.perf_counter() - t0) / codes.shape[1]

    user = torch.from_numpy(codes[: model.n_user].T.copy())
    steps = min(user.shape[0], 10 if quick else 60)

    def lm() -> float:
        with torch.inference_mode(), model.streaming(1, seed=0):
            kv = model.encode_image(encoder.encode([p["image"]]))
            t0 = time.perf_counter()
            for i in range(steps):
                model.step(user[i : i + 1], kv)
            return (time.perf_counter() - t0) / steps

    def start() -> None:
        with torch.inference_mode():
            model.encode_image(encoder.encode([p["image"]]))

    t = interleaved({"codec_encode": enc, "lm_step": lm, "codec_decode": dec}, reps)
    out = {k: scaled(stats(v), 1000) for k, v in t.items()}
    out["image_session_start"] = scaled(stats(interleaved({"s": start}, reps)["s"]), 1000)
    return out
