"""World stage 3: speak the spoken dialogues (TTS, full-duplex timeline) into moshi-finetune files."""

from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor

from tqdm.auto import tqdm

from moshivis_lab.artefacts import Stage, config_hash, read_json
from moshivis_lab.config import LabConfig
from moshivis_lab.world import formats
from moshivis_lab.world.build import SPLITS, item_rng
from moshivis_lab.world.generate import world_paths
from moshivis_lab.world.speech import ASSISTANT_VOICE, user_voices
from moshivis_lab.world.timeline import SAMPLE_RATE, TTSCache, build_timeline

_TTS: TTSCache | None = None


def voices_for_split(cfg: LabConfig, split: str) -> list:
    """User voices used in a split: training never hears the held-out voices; the others hear all."""
    vs = list(user_voices(cfg.world.n_user_voices))
    return vs[: len(vs) - cfg.world.n_heldout_voices] if split == "train" else vs


def _speak_job(job: tuple[str, int, dict], cfg: LabConfig) -> dict:
    global _TTS
    if _TTS is None:
        _TTS = TTSCache()
    split, index, rec = job
    rng = item_rng(cfg, "speech", split, index)
    voices = voices_for_split(cfg, split)
    voice = voices[int(rng.integers(len(voices)))]
    topic = rec.get("topic") or "image"
    refs = rec.get("refs") or [[] for _ in rec["turns"]]
    turns = [(s, t, topic, r) for (s, t), r in zip(rec["turns"], refs, strict=True)]
    sd = build_timeline(
        rec["id"],
        turns,
        voice,
        rng,
        pause_range_s=cfg.world.pause_range_s,
        lead_in_range_s=cfg.world.lead_in_range_s,
        tts=_TTS,
    )
    rel = f"{split}/{rec['id']}.wav"
    info = {
        "alignments": [[w, list(ts), spk] for w, ts, spk in sd.alignments],
        "id": rec["id"],
        "kind": rec.get("kind", ""),
        "topic": topic,
        "image_id": rec.get("image_id"),
        "turns": [t.__dict__ for t in sd.turns],
        "qa": rec.get("qa", []),
        "user_voice": sd.user_voice,
        "assistant_voice": sd.assistant_voice,
        "sample_rate": SAMPLE_RATE,
    }
    formats.write_spoken(cfg.world_dir / "spoken" / rel, sd.wav, SAMPLE_RATE, info)
    return {"path": rel, "duration": sd.duration}


def _speak_chunk(jobs: list[tuple[str, int, dict]], cfg: LabConfig) -> list[dict]:
    return [_speak_job(j, cfg) for j in jobs]


# Bumped when the synthesis changes the audio (2: every utterance from a pristine espeak-ng), so
# that a world spoken by the older code is rebuilt instead of reused.
TTS_VERSION = 2


def build_speech(cfg: LabConfig, progress: bool = True, chunk: int = 25) -> dict:
    """Stage 3: every spoken image dialogue and every chit-chat dialogue as stereo wav + JSON.

    Every utterance is synthesized from a pristine espeak-ng (``world.speech.synthesize``), so
    the wav files are identical from run to run whatever the process, the order or the number
    of workers: ``cfg.workers`` spawned processes share the dialogues in chunks.
    """
    key = config_hash(cfg.world, ASSISTANT_VOICE.__dict__, {"tts": TTS_VERSION})
    stage = Stage(cfg.world_dir, "speech", key)
    if stage.done:
        return stage.info()
    t0 = time.time()
    jobs_by_split = {}
    for split in SPLITS:
        p = world_paths(cfg, split)
        recs = [r for r in read_json(p["dialogues"]) if r.get("spoken")]
        recs += read_json(p["chitchat"])
        jobs_by_split[split] = [(split, i, _as_turns(r)) for i, r in enumerate(recs)]
    total = sum(len(j) for j in jobs_by_split.values())
    counts = {}
    total_s = 0.0
    bar = tqdm(total=total, desc="speech", disable=not progress, unit="dlg", dynamic_ncols=True)
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as ex:
        for split, jobs in jobs_by_split.items():
            futures = [
                ex.submit(_speak_chunk, jobs[k : k + chunk], cfg)
                for k in range(0, len(jobs), chunk)
            ]
            out: list[dict] = []
            for f in futures:  # results in submission order
                res = f.result()
                out += res
                bar.update(len(res))
            formats.write_spoken_index(world_paths(cfg, split)["spoken"], out)
            dur = sum(o["duration"] for o in out)
            counts[split] = {"dialogues": len(out), "hours": round(dur / 3600, 3)}
            total_s += dur
    bar.close()
    return stage.finish(
        seconds=round(time.time() - t0, 2), counts=counts, audio_hours=round(total_s / 3600, 3)
    )


def _as_turns(rec: dict) -> dict:
    """A LLaVA record's conversations back as (speaker, text) turns."""
    turns = [
        ("user" if c["from"] == "human" else "assistant", c["value"]) for c in rec["conversations"]
    ]
    return {**rec, "turns": turns}
