"""The tokenising layer: real-format files in, memory-mapped token shards and a manifest out.

Spoken dialogues become aligned token grids int16 ``[17, T]``: row 0 the assistant's text stream
(Moshi's inner monologue, aligned by ``alignment``), rows 1..8 the assistant's codec codes, rows
9..16 the user's. Speechless samples (captions, VQA, OCR, counting, image dialogues as text) become
token sequences with a role per token (0 user, 1 assistant); the trainer lays them in the text row
with the zero token (-1) on every audio row.

Each shard is ``{name}.bin`` (flat int16, read with ``np.memmap``), ``{name}.idx.npy`` (offset,
rows, length per sample) and ``{name}.meta.jsonl``; ``manifest.json`` lists counts, the seed and
the sha256 of every file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from moshivis_lab.artefacts import (
    Stage,
    atomic_open,
    atomic_path,
    config_hash,
    read_json,
    sha256_file,
    write_json,
)
from moshivis_lab.config import ZERO_TOKEN, LabConfig
from moshivis_lab.world import formats
from moshivis_lab.world.alignment import TimedTokens, align_text_stream
from moshivis_lab.world.build import SPLITS, iter_files, pool_map, write_checksums
from moshivis_lab.world.generate import world_paths
from moshivis_lab.world.timeline import MAIN_SPEAKER
from moshivis_lab.world.tokenizer import TextTokenizer

SHARD_DTYPE = np.int16


class ShardWriter:
    """Append samples to a shard; nothing is visible under the final names until ``close``."""

    def __init__(self, directory: str | os.PathLike[str], name: str) -> None:
        self.dir = Path(directory)
        self.name = name
        self.dir.mkdir(parents=True, exist_ok=True)
        self._bin_ctx = atomic_path(self.dir / f"{name}.bin")
        self._tmp = self._bin_ctx.__enter__()
        self._f = open(self._tmp, "wb")  # noqa: SIM115 (closed in close())
        self._index: list[tuple[int, int, int]] = []
        self._meta: list[dict] = []
        self._offset = 0

    def add(self, tokens: np.ndarray, meta: dict) -> None:
        """Append one sample: int array [rows, length] (or [length]) plus its metadata."""
        a = np.asarray(tokens)
        if a.ndim == 1:
            a = a[None]
        if a.min(initial=0) < ZERO_TOKEN or a.max(initial=0) > np.iinfo(SHARD_DTYPE).max:
            raise ValueError(
                f"{meta.get('id')}: token ids out of int16 range [{a.min()}, {a.max()}]"
            )
        b = np.ascontiguousarray(a, dtype=SHARD_DTYPE)
        self._f.write(b.tobytes())
        self._index.append((self._offset, b.shape[0], b.shape[1]))
        self._offset += b.size
        self._meta.append(meta)

    def close(self) -> list[Path]:
        """Flush the data file, write index and metadata, move everything into place."""
        self._f.close()
        idx = np.asarray(self._index, dtype=np.int64).reshape(-1, 3)
        with atomic_path(self.dir / f"{self.name}.idx.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, idx)
        with atomic_open(self.dir / f"{self.name}.meta.jsonl", "w", encoding="utf-8") as f:
            for m in self._meta:
                f.write(json.dumps(m, ensure_ascii=False) + "\n")
        self._bin_ctx.__exit__(None, None, None)
        return [self.dir / f"{self.name}{s}" for s in (".bin", ".idx.npy", ".meta.jsonl")]


class ShardReader:
    """Random access to one shard through a read-only memory map."""

    def __init__(self, directory: str | os.PathLike[str], name: str) -> None:
        d = Path(directory)
        self.path = d / f"{name}.bin"
        for p in (self.path, d / f"{name}.idx.npy", d / f"{name}.meta.jsonl"):
            if not p.exists():
                raise FileNotFoundError(
                    f"{p} is missing; build the shards with `moshivis-lab data`"
                )
        self.index = np.load(d / f"{name}.idx.npy")
        with open(d / f"{name}.meta.jsonl", encoding="utf-8") as f:
            self.meta = [json.loads(line) for line in f if line.strip()]
        if len(self.meta) != len(self.index):
            raise ValueError(
                f"{d}/{name}: {len(self.index)} index rows but {len(self.meta)} metadata rows"
            )
        size = os.path.getsize(self.path) // np.dtype(SHARD_DTYPE).itemsize
        expect = int((self.index[:, 1] * self.index[:, 2]).sum()) if len(self.index) else 0
        if size != expect:
            raise ValueError(
                f"{self.path}: holds {size} tokens but the index describes {expect}; rebuild it"
            )
        self.data = (
            np.memmap(self.path, dtype=SHARD_DTYPE, mode="r") if size else np.zeros(0, SHARD_DTYPE)
        )

    def __len__(self) -> int:
        return len(self.index)

    def tokens(self, i: int) -> np.ndarray:
        """Sample ``i`` as int16 [rows, length] (a view into the memory map)."""
        off, rows, length = (int(x) for x in self.index[i])
        return self.data[off : off + rows * length].reshape(rows, length)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"tokens": self.tokens(i), **self.meta[i]}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]


def text_stream(
    tok: TextTokenizer, alignments: list, num_frames: int, frame_rate: float
) -> np.ndarray:
    """The assistant's text row from moshi-finetune alignments (main speaker's words only)."""
    words = [
        TimedTokens(tuple(tok.encode_word(w)), float(ts[0]), float(ts[1]))
        for w, ts, spk in alignments
        if spk == MAIN_SPEAKER
    ]
    return align_text_stream(words, num_frames, frame_rate)


class SegmentEncoder:
    """Encode a channel by its non-silent stretches, with a cache keyed by the stretch's bytes.

    A channel of a full-duplex recording is digital silence while the other side speaks. Frames
    farther than ``margin`` frames from any sound are encoded once as the codec's silence column;
    each stretch of sound is encoded with ``margin`` frames of its surrounding silence, which
    gives exactly the codes of encoding the whole channel as long as the codec looks at most
    ``margin`` frames around a frame (checked by a test for the tiny codec). Repeated
    utterances (the same TTS audio at a frame boundary) hit the cache. Recordings without exact
    silence (real microphones) simply form one stretch: the whole channel, encoded as usual.
    """

    def __init__(self, codec: Any, margin: int = 3, max_items: int = 20000) -> None:
        self.codec = codec
        self.margin = margin
        self.max_items = max_items
        self.cache: dict[bytes, np.ndarray] = {}
        self.hits = 0
        F = codec.frame_size
        silence = codec.encode(np.zeros((2 * margin + 1) * F, np.float32), codec.sample_rate)
        self.silence = silence[:, margin]

    def encode(self, wav: np.ndarray) -> np.ndarray:
        """Codes ``[K, T]`` of a mono channel at the codec's sample rate."""
        F, m = self.codec.frame_size, self.margin
        T = -(-len(wav) // F)
        x = np.zeros(T * F, np.float32)
        x[: len(wav)] = wav
        loud = np.abs(x.reshape(T, F)).max(axis=1) > 0
        out = np.repeat(self.silence[:, None], T, axis=1)
        idx = np.nonzero(loud)[0]
        if idx.size == 0:
            return out
        # stretches of sound whose silent gaps are too short to separate them
        breaks = np.nonzero(np.diff(idx) > 2 * m + 1)[0]
        starts = np.r_[idx[0], idx[breaks + 1]]
        ends = np.r_[idx[breaks], idx[-1]] + 1
        for a, b in zip(starts, ends, strict=True):
            lo, hi = a - m, b + m
            seg = np.zeros((hi - lo) * F, np.float32)
            src_lo, src_hi = max(lo, 0), min(hi, T)
            seg[(src_lo - lo) * F : (src_hi - lo) * F] = x[src_lo * F : src_hi * F]
            key = hashlib.sha1(seg.tobytes()).digest()
            codes = self.cache.get(key)
            if codes is None:
                codes = self.codec.encode(seg, self.codec.sample_rate)
                if len(self.cache) < self.max_items:
                    self.cache[key] = codes
            else:
                self.hits += 1
            out[:, src_lo:src_hi] = codes[:, src_lo - lo : src_hi - lo]
        return out


_SEGMENT_ENCODER: SegmentEncoder | None = None


def _segment_encoder(codec: Any) -> SegmentEncoder:
    global _SEGMENT_ENCODER
    if _SEGMENT_ENCODER is None or _SEGMENT_ENCODER.codec is not codec:
        _SEGMENT_ENCODER = SegmentEncoder(codec)
    return _SEGMENT_ENCODER


def _spoken_job(
    job: tuple[str, str], cfg: LabConfig, tok: TextTokenizer, codec: Any
) -> tuple[np.ndarray, dict]:
    wav_path, _ = job
    rec = formats.SpokenRecord(Path(wav_path), 0.0, read_json(Path(wav_path).with_suffix(".json")))
    stereo = rec.load(codec.sample_rate)
    enc = _segment_encoder(codec)
    a = enc.encode(stereo[0])
    u = enc.encode(stereo[1])
    t = a.shape[1]
    text = text_stream(tok, rec.info["alignments"], t, codec.frame_rate)
    grid = np.concatenate([text[None], a, u], axis=0)
    fr = codec.frame_rate
    turns = [
        {**tn, "start_frame": int(tn["start"] * fr), "end_frame": int(np.ceil(tn["end"] * fr))}
        for tn in rec.info.get("turns", [])
    ]
    meta = {k: rec.info.get(k) for k in ("id", "kind", "topic", "image_id", "qa", "user_voice")}
    meta["turns"] = turns
    meta["wav"] = Path(wav_path).name
    return grid, meta


def _text_sample(tok: TextTokenizer, s: formats.ImageText) -> tuple[np.ndarray, np.ndarray]:
    ids: list[int] = []
    roles: list[int] = []
    for who, text in s.turns:
        t = tok.encode(text)
        ids += t
        roles += [1 if who == "assistant" else 0] * len(t)
    return np.asarray(ids, dtype=np.int64), np.asarray(roles, dtype=np.int64)


def read_image_texts(cfg: LabConfig, split: str) -> list[formats.ImageText]:
    """Every speechless image-text sample of a split, read back through the real-format readers."""
    p = world_paths(cfg, split)
    out = formats.read_coco_captions(p["captions"], p["images"])
    for t in ("vqa", "ocr", "count"):
        out += formats.read_vqa(p[t], p["images"])
    out += formats.read_llava(p["dialogues"], p["images"])
    return out


def _codec_key(cfg: LabConfig) -> str:
    """``codec_stamp_key`` without the fit's ``report.json``: it holds timings, and an identical
    codec must give the same shard key (and ``manifest.json``) from build to build."""
    from moshivis_lab.audio.codecs import codec_stamp_key

    if cfg.codec.kind == "mimi":
        return codec_stamp_key(cfg)
    files = [
        p
        for p in sorted(cfg.codec_dir.glob("*"))
        if p.is_file() and not p.name.startswith(".") and p.name != "report.json"
    ]
    return config_hash([sha256_file(p) for p in files])


def build_shards(cfg: LabConfig, progress: bool = True) -> dict:
    """Stage 6: tokenise every split into speech and text shards; write ``manifest.json``."""
    from moshivis_lab.audio.codecs import load_codec

    tok = TextTokenizer.load(cfg.tokenizer_path)
    key = config_hash(
        cfg.world, cfg.codec, cfg.tokenizer, _codec_key(cfg), sha256_file(cfg.tokenizer_path)
    )
    stage = Stage(cfg.shards_dir, "shards", key)
    if stage.done:
        return stage.info()
    t0 = time.time()
    codec = load_codec(cfg)
    counts: dict[str, dict] = {}
    files: list[Path] = []
    for split in SPLITS:
        out_dir = cfg.shards_dir / split
        recs = list(formats.read_spoken_index(world_paths(cfg, split)["spoken"]))
        jobs = [(str(r.wav_path), r.info.get("id", "")) for r in recs]
        fn = partial(_spoken_job, cfg=cfg, tok=tok, codec=codec)
        w = ShardWriter(out_dir, "speech")
        frames = 0
        for grid, meta in pool_map(
            fn, jobs, cfg.workers, f"tokenise speech {split}", progress, chunksize=4
        ):
            w.add(grid, meta)
            frames += grid.shape[1]
        files += w.close()
        w = ShardWriter(out_dir, "text")
        n_tok = 0
        for s in read_image_texts(cfg, split):
            ids, roles = _text_sample(tok, s)
            w.add(np.stack([ids, roles]), {"image_id": s.image_id, "task": s.task, **s.meta})
            n_tok += len(ids)
        files += w.close()
        counts[split] = {
            "speech_samples": len(recs),
            "speech_frames": frames,
            "text_samples": len(ShardReader(out_dir, "text")),
            "text_tokens": n_tok,
        }
    manifest = {
        "preset": cfg.name,
        "seed": cfg.world.seed,
        "config_hash": key,
        "counts": counts,
        "text_vocab": tok.vocab_size,
        "codec": {
            "kind": cfg.codec.kind,
            "num_codebooks": codec.num_codebooks,
            "cardinality": codec.cardinality,
            "frame_rate": codec.frame_rate,
        },
        "grid_rows": "0: assistant text, 1..K: assistant codes, K+1..2K: user codes",
        "files": {p.relative_to(cfg.shards_dir).as_posix(): sha256_file(p) for p in sorted(files)},
        "tokenizer_sha256": sha256_file(cfg.tokenizer_path),
        "world_checksums_sha256": write_checksums(
            cfg.world_dir,
            iter_files(cfg.world_dir, ("*.json", "images/*.png", "spoken/*.jsonl", "spoken/*/*")),
            cfg.shards_dir / "world.sha256",
        ),
    }
    write_json(cfg.shards_dir / "manifest.json", manifest)
    return stage.finish(seconds=round(time.time() - t0, 2), counts=counts)


def load_split(cfg: LabConfig, split: str) -> dict[str, ShardReader]:
    """The speech and text shards of one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    d = cfg.shards_dir / split
    return {"speech": ShardReader(d, "speech"), "text": ShardReader(d, "text")}


def corpus_sentences(cfg: LabConfig, split: str = "train") -> list[str]:
    """Every sentence of a split's world text (image-text samples, dialogues, chit-chat)."""
    out = [text for s in read_image_texts(cfg, split) for _, text in s.turns]
    p = world_paths(cfg, split)
    out += [text for s in formats.read_llava(p["chitchat"], p["images"]) for _, text in s.turns]
    return out


def build_tokenizer_stage(cfg: LabConfig) -> dict:
    """Stage 4: train the tiny SentencePiece model on the training split's text (or check Moshi's)."""
    from moshivis_lab.world.tokenizer import train_tokenizer

    if cfg.tokenizer.model_path:
        tok = TextTokenizer.load(cfg.tokenizer.model_path)
        return {
            "stage": "tokenizer",
            "source": cfg.tokenizer.model_path,
            "vocab_size": tok.vocab_size,
        }
    stage = Stage(cfg.tokenizer_path.parent, "tokenizer", config_hash(cfg.world, cfg.tokenizer))
    if stage.done and cfg.tokenizer_path.exists():
        return stage.info()
    t0 = time.time()
    sentences = corpus_sentences(cfg)
    tok = train_tokenizer(
        sentences,
        cfg.tokenizer_path,
        cfg.tokenizer.vocab_size,
        cfg.world.seed,
        cfg.tokenizer.character_coverage,
    )
    return stage.finish(
        seconds=round(time.time() - t0, 2), sentences=len(sentences), vocab_size=tok.vocab_size
    )
