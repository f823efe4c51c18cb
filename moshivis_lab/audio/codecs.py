"""Pick, fit and load the codec a lab config names (the tiny one fitted here, or Mimi)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from moshivis_lab.artefacts import Stage, config_hash, read_json, sha256_file, write_json
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


def _labelled_speech(cfg: LabConfig, n: int) -> list:
    """``n`` training-split turns spoken again, with the TTS phonemes recorded: ``2 n`` utterances.

    Each turn is spoken by its world voice (user turns round-robin over the training user
    voices, assistant turns by the assistant) and by one of ``CODEC_FIT_VOICES``, extra voices
    that give the phone classifier speaker variety (on the unseen user voices, its point
    accuracy rose from 49 % to 61 % with them).
    """
    from moshivis_lab.world.generate import world_paths
    from moshivis_lab.world.speak import voices_for_split
    from moshivis_lab.world.speech import ASSISTANT_VOICE, CODEC_FIT_VOICES, synthesize

    paths = world_paths(cfg, "train")
    turns = [
        (c["from"], c["value"])
        for key in ("chitchat", "dialogues")
        if paths[key].exists()
        for rec in read_json(paths[key])
        for c in rec["conversations"]
        if c["value"].strip()
    ]
    if not turns:
        raise FileNotFoundError(
            f"no training dialogues under {cfg.world_dir}; build the world first"
        )
    rng = np.random.default_rng(cfg.codec.seed)
    pick = rng.choice(len(turns), size=min(n, len(turns)), replace=False)
    users = voices_for_split(cfg, "train")
    out = []
    for j, i in enumerate(sorted(pick)):
        who, text = turns[i]
        voice = ASSISTANT_VOICE if who == "gpt" else users[j % len(users)]
        out.append(synthesize(text, voice))
        out.append(synthesize(text, CODEC_FIT_VOICES[j % len(CODEC_FIT_VOICES)]))
    return out


def fit_codec_stage(cfg: LabConfig, progress: bool = True) -> dict:
    """Stage 4: fit the tiny codec on the training split's speech and report its round trip."""
    if cfg.codec.kind != "tiny":
        return {"stage": "codec", "skipped": f"{cfg.codec.kind} codec is pretrained"}
    from moshivis_lab.audio.tiny_codec import FORMAT_VERSION, TinyCodec

    stage = Stage(cfg.codec_dir, "codec", config_hash(cfg.world, cfg.codec, FORMAT_VERSION))
    if stage.done:
        return stage.info()
    t0 = time.time()
    labelled = None
    if cfg.codec.semantic == "phonetic":
        labelled = _labelled_speech(cfg, cfg.codec.phone_sentences)
    codec = TinyCodec.fit(
        _training_speech(cfg, cfg.codec.fit_seconds),
        cfg.codec,
        progress=progress,
        labelled=labelled,
    )
    fit_s = time.time() - t0
    codec.save(cfg.codec_dir)
    report = evaluate_codec(cfg, codec)
    report["fit_seconds"] = round(fit_s, 2)
    write_json(cfg.codec_dir / "report.json", report)
    return stage.finish(seconds=round(time.time() - t0, 2), **report)


def heldout_speech(n: int = 12, seed: int = 123) -> dict[str, list[np.ndarray]]:
    """Fresh TTS sentences by the held-out user voices and by the assistant voice, for codec checks."""
    return {k: [u.wav for u in us] for k, us in heldout_utterances(n, seed).items()}


def heldout_utterances(n: int = 12, seed: int = 123) -> dict[str, list]:
    """``heldout_speech`` as ``world.speech.Utterance`` objects (words and phonemes kept)."""
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
        "heldout_voices": [synthesize(t, held[i % 2]) for i, t in enumerate(texts)],
        "assistant_voice": [synthesize(t, ASSISTANT_VOICE) for t in texts],
    }


def evaluate_codec(cfg: LabConfig, codec) -> dict:  # noqa: ANN001
    """Round-trip quality (pyin F0 correlation, F0 error, voicing, MCD, speed) on unseen voices."""
    from moshivis_lab.audio.quality import codec_round_trip_report

    speech = heldout_utterances()
    report = {
        name: codec_round_trip_report(codec, [u.wav for u in us], cfg.codec.sample_rate)
        for name, us in speech.items()
    }
    if cfg.codec.kind == "tiny":
        from moshivis_lab.audio.tiny_codec import phone_accuracy

        assistant = speech["assistant_voice"]  # a training voice, the same sentences
        report["phone_accuracy"] = {
            "heldout_voices": phone_accuracy(codec, speech["heldout_voices"], reference=assistant),
            "assistant_voice": phone_accuracy(codec, assistant),
        }
    return report
