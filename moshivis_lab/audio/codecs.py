"""Pick, fit and load the codec a lab config names (the tiny one fitted here, or Mimi)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from moshivis_lab.artefacts import Stage, config_hash, sha256_file, write_json
from moshivis_lab.config import LabConfig


def codec_stamp_key(cfg: LabConfig) -> str:
    """What identifies the codec in use: the fitted tiny codec's files, or Mimi's weights path."""
    if cfg.codec.kind == "mimi":
        return f"mimi:{cfg.codec.mimi_path}"
    files = sorted(p for p in cfg.codec_dir.glob("*") if p.is_file() and not p.name.startswith("."))
    return config_hash([sha256_file(p) for p in files])


def load_codec(cfg: LabConfig):  # noqa: ANN201 (returns a Codec)
    """The codec of ``cfg``: TinyCodec from ``cfg.codec_dir`` or MimiCodec from ``cfg.codec.mimi_path``."""
    if cfg.codec.kind == "mimi":
        from moshivis_lab.audio.mimi import MimiCodec

        return MimiCodec.from_config(cfg.codec)
    from moshivis_lab.audio.tiny_codec import CONFIG_FILE, TinyCodec

    if not (cfg.codec_dir / CONFIG_FILE).exists():
        raise FileNotFoundError(
            f"no fitted codec in {cfg.codec_dir}; run `moshivis-lab data --preset {cfg.name}` first"
        )
    return TinyCodec.load(cfg.codec_dir)


def _training_speech(cfg: LabConfig, seconds: float) -> Iterator[np.ndarray]:
    """Mono channels of the training split's spoken dialogues, up to ``seconds`` of audio."""
    from moshivis_lab.world import formats
    from moshivis_lab.world.generate import world_paths

    total = 0.0
    for rec in formats.read_spoken_index(world_paths(cfg, "train")["spoken"]):
        stereo = rec.load(cfg.codec.sample_rate)
        for ch in stereo:
            yield ch
            total += len(ch) / cfg.codec.sample_rate
        if total >= seconds:
            return


def fit_codec_stage(cfg: LabConfig, progress: bool = True) -> dict:
    """Stage 4: fit the tiny codec on the training split's speech and report its round trip."""
    if cfg.codec.kind != "tiny":
        return {"stage": "codec", "skipped": f"{cfg.codec.kind} codec is pretrained"}
    from moshivis_lab.audio.tiny_codec import FORMAT_VERSION, TinyCodec

    stage = Stage(cfg.codec_dir, "codec", config_hash(cfg.world, cfg.codec, FORMAT_VERSION))
    if stage.done:
        return stage.info()
    t0 = time.time()
    codec = TinyCodec.fit(
        _training_speech(cfg, cfg.codec.fit_seconds), cfg.codec, progress=progress
    )
    fit_s = time.time() - t0
    codec.save(cfg.codec_dir)
    report = evaluate_codec(cfg, codec)
    report["fit_seconds"] = round(fit_s, 2)
    write_json(cfg.codec_dir / "report.json", report)
    return stage.finish(seconds=round(time.time() - t0, 2), **report)


def heldout_speech(n: int = 12, seed: int = 123) -> dict[str, list[np.ndarray]]:
    """Fresh TTS sentences by the held-out user voices and by the assistant voice, for codec checks."""
    from moshivis_lab.world.dialogues import chitchat_dialogue
    from moshivis_lab.world.speech import ASSISTANT_VOICE, USER_VOICES, synthesize

    rng = np.random.default_rng(seed)
    texts: list[str] = []
    while len(texts) < n:
        d = chitchat_dialogue(rng, f"codec_eval_{len(texts)}")
        texts += [t.text for t in d.turns if len(t.text.split()) >= 3]
    texts = texts[:n]
    held = USER_VOICES[-2:]
    return {
        "heldout_voices": [synthesize(t, held[i % 2]).wav for i, t in enumerate(texts)],
        "assistant_voice": [synthesize(t, ASSISTANT_VOICE).wav for t in texts],
    }


def evaluate_codec(cfg: LabConfig, codec) -> dict:  # noqa: ANN001
    """Round-trip quality (pyin F0 correlation, F0 error, voicing, MCD, speed) on unseen voices."""
    from moshivis_lab.audio.quality import codec_round_trip_report

    speech = heldout_speech()
    return {
        name: codec_round_trip_report(codec, wavs, cfg.codec.sample_rate)
        for name, wavs in speech.items()
    }
