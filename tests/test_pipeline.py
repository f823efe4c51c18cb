"""The whole data build at smoke size: counts, splits, shards, alignment, determinism, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moshivis_lab.config import TEXT_EPAD_ID, TEXT_PAD_ID, LabConfig
from moshivis_lab.pipeline import build_data
from moshivis_lab.world import formats
from moshivis_lab.world.build import SPLITS, iter_files
from moshivis_lab.world.generate import load_scenes, world_paths
from moshivis_lab.world.shards import ShardReader, load_split
from moshivis_lab.world.tokenizer import TextTokenizer

WORLD_FILES = ("*.json", "images/*.png", "spoken/*.jsonl", "spoken/*/*")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[LabConfig, dict]:
    cfg = LabConfig.smoke(tmp_path_factory.mktemp("data"))
    return cfg, build_data(cfg, progress=False)


def test_counts_match_the_config(built) -> None:
    cfg, report = built
    w = cfg.world
    texts = report["stages"]["texts"]["counts"]
    assert sum(c["images"] for c in texts.values()) == w.n_images
    assert sum(c["image_dialogues"] for c in texts.values()) == w.n_image_dialogues
    assert sum(c["spoken_image_dialogues"] for c in texts.values()) == w.n_spoken_image_dialogues
    assert sum(c["chitchat_dialogues"] for c in texts.values()) == w.n_chitchat_dialogues
    n_samples = sum(
        c[f"{t}_samples"] for c in texts.values() for t in ("caption", "vqa", "ocr", "count")
    )
    assert n_samples == w.n_image_text_samples
    manifest = json.loads((cfg.shards_dir / "manifest.json").read_text())
    speech = sum(c["speech_samples"] for c in manifest["counts"].values())
    assert speech == w.n_spoken_image_dialogues + w.n_chitchat_dialogues
    assert manifest["seed"] == w.seed and manifest["codec"]["num_codebooks"] == 8
    for rel, digest in manifest["files"].items():
        assert len(digest) == 64 and (cfg.shards_dir / rel).exists()


def test_heldout_pairs_never_in_training_images(built) -> None:
    cfg, _ = built
    held = {tuple(p) for p in cfg.world.heldout_pairs}
    scenes = load_scenes(cfg)
    for split in ("train", "val", "test"):
        for s in scenes[split]:
            assert not (s.pairs & held), f"{s.id} contains a held-out pair"
    assert all(s.pairs & held for s in scenes["heldout"])


def test_training_split_never_hears_heldout_voices(built) -> None:
    cfg, _ = built
    from moshivis_lab.world.speech import user_voices

    held = {v.name for v in user_voices(cfg.world.n_user_voices)[-cfg.world.n_heldout_voices :]}
    recs = list(formats.read_spoken_index(world_paths(cfg, "train")["spoken"]))
    assert recs and not {r.info["user_voice"] for r in recs} & held


def test_speech_shards_are_aligned_token_grids(built) -> None:
    cfg, _ = built
    tok = TextTokenizer.load(cfg.tokenizer_path)
    sh = load_split(cfg, "train")["speech"]
    assert len(sh) > 0
    for i in range(min(len(sh), 10)):
        s = sh[i]
        g = np.asarray(s["tokens"], dtype=np.int64)
        assert g.shape[0] == 17
        assert g[1:].min() >= 0 and g[1:].max() < 256
        text = g[0]
        assert ((text >= 0) & (text < tok.vocab_size)).all()
        # the assistant's words, in order, are exactly the non-special tokens of row 0
        info = json.loads(
            (cfg.world_dir / "spoken" / "train" / s["wav"]).with_suffix(".json").read_text()
        )
        words = [w for w, _, spk in info["alignments"] if spk == "SPEAKER_MAIN"]
        expected = [t for w in words for t in tok.encode_word(w)]
        got = [int(t) for t in text if t not in (TEXT_PAD_ID, TEXT_EPAD_ID)]
        assert got == expected[: len(got)] and len(got) >= 0.9 * len(expected)
        # each assistant word starts at (or, when pushed by a long word, after) its frame
        first = [w for w in info["alignments"] if w[2] == "SPEAKER_MAIN"]
        if first:
            f = int(first[0][1][0] * 12.5)
            assert text[f] == tok.encode_word(first[0][0])[0] and text[f - 1] == TEXT_EPAD_ID
        # silent user frames and speaking user frames get different codes
        assert len(np.unique(g[9])) > 1


def test_text_shards_hold_roles(built) -> None:
    cfg, _ = built
    sh = ShardReader(cfg.shards_dir / "train", "text")
    tasks = {sh.meta[i]["task"] for i in range(len(sh))}
    assert {"caption", "vqa", "count"} <= tasks and {
        "PROP",
        "LOC",
        "NUM",
        "LEAD",
        "TNS",
        "COMB",
    } <= tasks
    ids, roles = sh.tokens(0)
    assert set(np.unique(roles)) <= {0, 1} and 1 in roles and 0 in roles and (ids > 3).all()


def test_codec_report_is_written(built) -> None:
    cfg, _ = built
    rep = json.loads((cfg.codec_dir / "report.json").read_text())
    for name in ("heldout_voices", "assistant_voice"):
        assert 0.0 <= rep[name]["voicing_agreement"] <= 1.0


def test_rebuild_skips_finished_stages(built) -> None:
    cfg, _ = built
    before = {p: p.stat().st_mtime_ns for p in iter_files(cfg.shards_dir, ("*/*",))}
    report = build_data(cfg, progress=False)
    assert report["seconds"] < 10
    assert before == {p: p.stat().st_mtime_ns for p in iter_files(cfg.shards_dir, ("*/*",))}


def test_same_seed_same_bytes_with_other_worker_count(built, tmp_path) -> None:
    cfg, _ = built
    other = LabConfig.smoke(tmp_path).replace(workers=1)
    build_data(other, progress=False, stages=("scenes", "texts", "speech"))
    a = {
        p.relative_to(cfg.world_dir): p.read_bytes() for p in iter_files(cfg.world_dir, WORLD_FILES)
    }
    b = {
        p.relative_to(other.world_dir): p.read_bytes()
        for p in iter_files(other.world_dir, WORLD_FILES)
    }
    assert a.keys() == b.keys() and len(a) > 100
    assert [k for k in a if a[k] != b[k]] == []


def test_interrupted_stage_leaves_no_partial_files(tmp_path, monkeypatch) -> None:
    from moshivis_lab.world import generate, scenes

    cfg = LabConfig.smoke(tmp_path).replace(workers=1)
    real = scenes.render
    calls = {"n": 0}

    def flaky(scene):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real(scene)

    monkeypatch.setattr(scenes, "render", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate.build_scenes(cfg, progress=False)
    assert not list(cfg.world_dir.rglob("*.tmp")), "a temporary file was left behind"
    assert not (cfg.world_dir / "scenes.json").exists()
    assert not (cfg.world_dir / ".scenes.done.json").exists()
    monkeypatch.setattr(scenes, "render", real)
    info = generate.build_scenes(cfg, progress=False)
    assert (
        info["images"] == cfg.world.n_images == len(list((cfg.world_dir / "images").glob("*.png")))
    )


def test_every_split_is_loadable(built) -> None:
    cfg, _ = built
    for split in SPLITS:
        sh = load_split(cfg, split)
        assert len(sh["text"]) > 0
    with pytest.raises(ValueError, match="unknown split"):
        load_split(cfg, "dev")


def test_segment_encoding_equals_whole_channel_encoding(built) -> None:
    cfg, _ = built
    from moshivis_lab.audio.codecs import load_codec
    from moshivis_lab.world.shards import SegmentEncoder

    codec = load_codec(cfg)
    enc = SegmentEncoder(codec)
    recs = list(formats.read_spoken_index(world_paths(cfg, "train")["spoken"]))[:6]
    for r in recs:
        for ch in r.load(codec.sample_rate):
            np.testing.assert_array_equal(enc.encode(ch), codec.encode(ch))
    noisy = np.random.default_rng(0).normal(0, 1e-3, 5 * codec.frame_size).astype(np.float32)
    np.testing.assert_array_equal(enc.encode(noisy), codec.encode(noisy))
    np.testing.assert_array_equal(
        enc.encode(np.zeros(100, np.float32)), codec.encode(np.zeros(100, np.float32))
    )
