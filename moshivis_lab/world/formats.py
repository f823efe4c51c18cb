"""Real dataset formats, written by the world and read by the tokenising layer (one path for both).

- Captions: COCO ``captions_*.json`` (``images`` + ``annotations`` with ``caption``).
- Questions: VQAv2 pairs ``*_questions.json`` / ``*_annotations.json`` (used for VQA, OCR-VQA
  and TallyQA-style counting alike).
- Image dialogues (text): LLaVA-style conversations ``[{id, image, conversations: [{from, value}]}]``.
- Spoken dialogues: moshi-finetune's layout, a ``.jsonl`` of ``{path, duration}`` and, per
  stereo wav (left = assistant, right = user), a ``.json`` with ``alignments``
  ``[[word, [start, end], speaker], ...]`` (extra keys are ignored by other readers).

So a researcher's COCO, DOCCI-as-COCO, VQA or own moshi-finetune recordings drop in unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from moshivis_lab.artefacts import atomic_open, atomic_path, read_json, write_json

# ---------------------------------------------------------------- captions (COCO)


def write_coco_captions(
    path: str | os.PathLike[str], images: list[dict], captions: list[dict]
) -> Path:
    """Write COCO captions: ``images`` [{id, file_name, width, height}], ``captions`` [{image_id, caption}]."""
    anns = [
        {"id": i, "image_id": c["image_id"], "caption": c["caption"]}
        for i, c in enumerate(captions)
    ]
    return write_json(
        path, {"info": {"description": "moshivis_lab world"}, "images": images, "annotations": anns}
    )


@dataclass
class ImageText:
    """One (image, user text, assistant text) sample read from any of the image-text formats."""

    image_id: str
    image_path: str
    turns: list[tuple[str, str]]  # (speaker "user"/"assistant", text)
    task: str
    meta: dict = field(default_factory=dict)


def read_coco_captions(
    path: str | os.PathLike[str], image_root: str | os.PathLike[str]
) -> list[ImageText]:
    """Read a COCO captions file as image-text samples ("Describe the image." -> caption)."""
    d = read_json(path)
    try:
        files = {im["id"]: im["file_name"] for im in d["images"]}
        out = []
        for a in d["annotations"]:
            out.append(
                ImageText(
                    image_id=str(a["image_id"]),
                    image_path=str(Path(image_root) / files[a["image_id"]]),
                    turns=[("user", "Describe the image."), ("assistant", a["caption"].strip())],
                    task="caption",
                )
            )
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO captions file (missing {e})") from e
    return out


# ---------------------------------------------------------------- questions (VQAv2)


def write_vqa(
    prefix: str | os.PathLike[str], images: list[dict], items: list[dict], task: str
) -> tuple[Path, Path]:
    """Write VQAv2 ``{prefix}_questions.json`` and ``{prefix}_annotations.json``.

    ``items``: [{image_id, question, answer, answer_type, refs?}].
    """
    qs, anns = [], []
    for qid, it in enumerate(items):
        qs.append({"question_id": qid, "image_id": it["image_id"], "question": it["question"]})
        anns.append(
            {
                "question_id": qid,
                "image_id": it["image_id"],
                "question_type": task,
                "answer_type": it["answer_type"],
                "multiple_choice_answer": it["answer"],
                "answers": [{"answer_id": 1, "answer": it["answer"]}],
                "refs": it.get("refs", []),
            }
        )
    info = {"description": "moshivis_lab world", "task": task}
    q = write_json(f"{prefix}_questions.json", {"info": info, "images": images, "questions": qs})
    a = write_json(f"{prefix}_annotations.json", {"info": info, "annotations": anns})
    return q, a


def read_vqa(prefix: str | os.PathLike[str], image_root: str | os.PathLike[str]) -> list[ImageText]:
    """Read a VQAv2 question/annotation pair as image-text samples."""
    qd = read_json(f"{prefix}_questions.json")
    ad = read_json(f"{prefix}_annotations.json")
    try:
        files = {im["id"]: im["file_name"] for im in qd.get("images", [])}
        answers = {a["question_id"]: a for a in ad["annotations"]}
        task = qd.get("info", {}).get("task", "vqa")
        out = []
        for q in qd["questions"]:
            a = answers[q["question_id"]]
            fname = files.get(q["image_id"], f"{q['image_id']}.png")
            out.append(
                ImageText(
                    image_id=str(q["image_id"]),
                    image_path=str(Path(image_root) / fname),
                    turns=[("user", q["question"]), ("assistant", a["multiple_choice_answer"])],
                    task=task,
                    meta={"answer_type": a.get("answer_type", ""), "refs": a.get("refs", [])},
                )
            )
    except (KeyError, TypeError) as e:
        raise ValueError(f"{prefix}: not a VQAv2 question/annotation pair (missing {e})") from e
    return out


# ---------------------------------------------------------------- image dialogues (LLaVA)


def write_llava(path: str | os.PathLike[str], records: Iterable[dict]) -> Path:
    """Write LLaVA-style conversations; ``records``: [{id, image, kind, turns: [(speaker, text)], ...}]."""
    out = []
    for r in records:
        conv = [{"from": "human" if s == "user" else "gpt", "value": t} for s, t in r["turns"]]
        extra = {k: v for k, v in r.items() if k not in ("id", "image", "turns")}
        out.append({"id": r["id"], "image": r["image"], "conversations": conv, **extra})
    return write_json(path, out)


def read_llava(path: str | os.PathLike[str], image_root: str | os.PathLike[str]) -> list[ImageText]:
    """Read LLaVA-style conversations as image-text samples (``<image>`` markers are dropped)."""
    d = read_json(path)
    out = []
    try:
        for r in d:
            turns = []
            for c in r["conversations"]:
                who = "user" if c["from"] in ("human", "user") else "assistant"
                turns.append((who, c["value"].replace("<image>", "").strip()))
            meta = {k: v for k, v in r.items() if k not in ("id", "image", "conversations")}
            image = r.get("image")
            out.append(
                ImageText(
                    image_id=str(r.get("image_id", Path(image).stem if image else "")),
                    image_path=str(Path(image_root) / image) if image else "",
                    turns=turns,
                    task=str(r.get("kind", "dialogue")),
                    meta={"id": r["id"], **meta},
                )
            )
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a LLaVA-style conversation file (missing {e})") from e
    return out


# ---------------------------------------------------------------- spoken dialogues (moshi-finetune)


def write_spoken(
    wav_path: str | os.PathLike[str], stereo: np.ndarray, sample_rate: int, info: dict
) -> Path:
    """Write one spoken dialogue: a 16-bit stereo wav (left assistant, right user) and its JSON.

    ``info`` must hold ``alignments``; the wav is written last-to-first atomically so a killed
    build never leaves a wav without its transcript.
    """
    wav_path = Path(wav_path)
    if stereo.ndim != 2 or stereo.shape[0] != 2:
        raise ValueError(f"stereo must be [2, N] (assistant, user), got shape {stereo.shape}")
    if "alignments" not in info:
        raise ValueError("info must contain 'alignments' ([[word, [start, end], speaker], ...])")
    write_json(wav_path.with_suffix(".json"), info)
    with atomic_path(wav_path) as tmp:
        sf.write(str(tmp), stereo.T, sample_rate, subtype="PCM_16", format="WAV")
    return wav_path


def write_spoken_index(path: str | os.PathLike[str], entries: Iterable[dict]) -> Path:
    """Write moshi-finetune's ``.jsonl`` index: one ``{path, duration}`` per line (paths relative)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        for e in entries:
            f.write(
                json.dumps({"path": e["path"], "duration": round(float(e["duration"]), 4)}) + "\n"
            )
    return Path(path)


@dataclass
class SpokenRecord:
    """A spoken dialogue on disk: the stereo wav's path, its duration and its transcript JSON."""

    wav_path: Path
    duration: float
    info: dict[str, Any]

    def load(self, sample_rate: int) -> np.ndarray:
        """The two channels as float32 [2, N] at ``sample_rate`` (mono files are rejected)."""
        from moshivis_lab.audio.io import resample

        try:
            data, sr = sf.read(str(self.wav_path), dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise ValueError(f"{self.wav_path}: cannot be read as audio ({e})") from e
        if data.shape[1] != 2:
            raise ValueError(
                f"{self.wav_path}: spoken dialogues must be stereo (left = assistant, right = user), "
                f"got {data.shape[1]} channel(s)"
            )
        return np.stack([resample(data[:, c], int(sr), sample_rate) for c in range(2)])


def read_spoken_index(path: str | os.PathLike[str]) -> Iterator[SpokenRecord]:
    """Iterate a moshi-finetune ``.jsonl`` index; each wav's transcript JSON is read beside it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no spoken-dialogue index here")
    root = path.parent
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
                wav = root / e["path"]
                dur = float(e["duration"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(
                    f"{path}:{n}: expected {{'path', 'duration'}}, got {line.strip()!r}"
                ) from err
            info = read_json(wav.with_suffix(".json"))
            if "alignments" not in info:
                raise ValueError(f"{wav.with_suffix('.json')}: no 'alignments' key")
            yield SpokenRecord(wav, dur, info)
