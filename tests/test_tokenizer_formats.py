"""Text tokenizer (Moshi's special ids), real dataset formats, and audio input handling."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf

from moshivis_lab.audio.io import is_silent, load_audio, prepare, to_mono_float
from moshivis_lab.world import formats
from moshivis_lab.world.tokenizer import TextTokenizer, train_tokenizer

CORPUS = [
    f"The {c} {s} is at the {p}."
    for c in ("red", "blue", "green")
    for s in ("circle", "star")
    for p in ("top", "left")
] * 30 + ["What is three plus four?", "Three plus four is seven.", "Hello! How are you?"] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "spm.model", vocab_size=300)


def test_special_ids_follow_moshi(tok: TextTokenizer) -> None:
    assert tok.piece(0) == "<EPAD>" and tok.piece(3) == "<PAD>" and tok.piece(-1) == "<zero>"
    ids = tok.encode("The red star is at the top.")
    assert ids and 0 not in ids and 3 not in ids
    assert tok.decode(ids) == "The red star is at the top."
    assert tok.decode([0, 3, -1, *ids]) == "The red star is at the top."


def test_unknown_characters_never_become_epad(tok: TextTokenizer) -> None:
    ids = tok.encode("Zürich ☃ naïve")
    assert 0 not in ids and tok.decode(ids) == "Zürich ☃ naïve"
    assert tok.encode("") == [] and tok.encode("   ") == []
    with pytest.raises(ValueError, match="str"):
        tok.encode(None)  # type: ignore[arg-type]


def test_training_is_deterministic(tmp_path) -> None:
    a = train_tokenizer(CORPUS, tmp_path / "a.model", vocab_size=300)
    b = train_tokenizer(CORPUS, tmp_path / "b.model", vocab_size=300)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.vocab_size == b.vocab_size
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer(["", "  "], tmp_path / "c.model")


def test_loader_checks_the_id_layout(tmp_path) -> None:
    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        vocab_size=60,
        unk_id=1,
        bos_id=0,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    (tmp_path / "bad.model").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="PAD|EPAD"):
        TextTokenizer.load(tmp_path / "bad.model")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        TextTokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="SentencePiece"):
        TextTokenizer.load(tmp_path / "junk.model")


def test_formats_round_trip(tmp_path) -> None:
    images = [{"id": "im0", "file_name": "im0.png", "width": 64, "height": 64}]
    formats.write_coco_captions(
        tmp_path / "cap.json", images, [{"image_id": "im0", "caption": "A red star."}]
    )
    caps = formats.read_coco_captions(tmp_path / "cap.json", tmp_path)
    assert caps[0].turns[-1] == ("assistant", "A red star.") and caps[0].image_path.endswith(
        "im0.png"
    )
    items = [
        {
            "image_id": "im0",
            "question": "What colour is the star?",
            "answer": "red",
            "answer_type": "colour",
            "refs": [0],
        }
    ]
    formats.write_vqa(tmp_path / "vqa", images, items, "vqa")
    q = formats.read_vqa(tmp_path / "vqa", tmp_path)
    assert q[0].turns == [("user", "What colour is the star?"), ("assistant", "red")]
    assert q[0].meta["refs"] == [0]
    formats.write_llava(
        tmp_path / "d.json",
        [
            {
                "id": "d0",
                "image": "im0.png",
                "kind": "PROP",
                "turns": [("user", "Hi"), ("assistant", "Hello")],
            }
        ],
    )
    d = formats.read_llava(tmp_path / "d.json", tmp_path)
    assert d[0].turns == [("user", "Hi"), ("assistant", "Hello")] and d[0].task == "PROP"
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="COCO"):
        formats.read_coco_captions(tmp_path / "bad.json", tmp_path)
    (tmp_path / "corrupt.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        formats.read_llava(tmp_path / "corrupt.json", tmp_path)


def test_spoken_round_trip_and_mono_rejected(tmp_path) -> None:
    stereo = np.zeros((2, 4800), np.float32)
    stereo[0, :100] = 0.5
    info = {"alignments": [["hi", [0.0, 0.1], "SPEAKER_MAIN"]]}
    formats.write_spoken(tmp_path / "s" / "a.wav", stereo, 24000, info)
    formats.write_spoken_index(tmp_path / "s.jsonl", [{"path": "s/a.wav", "duration": 0.2}])
    (rec,) = list(formats.read_spoken_index(tmp_path / "s.jsonl"))
    assert rec.info["alignments"][0][0] == "hi" and rec.duration == 0.2
    wav = rec.load(16000)
    assert wav.shape == (2, 3200)
    with pytest.raises(ValueError, match="stereo"):
        formats.write_spoken(tmp_path / "m.wav", stereo[:1], 24000, info)
    sf.write(tmp_path / "s" / "mono.wav", stereo[0], 24000)
    (tmp_path / "s" / "mono.json").write_text('{"alignments": []}')
    formats.write_spoken_index(tmp_path / "m.jsonl", [{"path": "s/mono.wav", "duration": 0.2}])
    with pytest.raises(ValueError, match="stereo"):
        next(formats.read_spoken_index(tmp_path / "m.jsonl")).load(24000)


@pytest.mark.parametrize(
    ("arr", "sr"),
    [
        ((np.sin(np.arange(8000) / 10) * 20000).astype(np.int16), 8000),
        ((np.sin(np.arange(44100) / 10) * 2**30).astype(np.int32), 44100),
        (np.sin(np.arange(48000) / 10).astype(np.float64) * 0.5, 48000),
        (np.stack([np.sin(np.arange(16000) / 10)] * 2).astype(np.float32) * 0.5, 16000),
        (np.stack([np.sin(np.arange(16000) / 10)] * 2, axis=1).astype(np.float32) * 0.5, 16000),
        ((np.sin(np.arange(8000) / 10) * 100 + 128).astype(np.uint8), 8000),
    ],
)
def test_prepare_accepts_any_pcm(arr, sr) -> None:
    out = prepare(arr, sr, 24000)
    assert out.dtype == np.float32 and out.ndim == 1
    assert (
        abs(
            len(out)
            - round(arr.shape[-1 if arr.ndim == 1 or arr.shape[0] == 2 else 0] * 24000 / sr)
        )
        <= 2
    )
    assert 0.2 < np.abs(out).max() <= 1.0


@pytest.mark.parametrize(
    ("arr", "match"),
    [
        (np.array([0.0, np.nan, 0.1], np.float32), "NaN"),
        (np.array([0.0, np.inf], np.float32), "NaN or inf"),
        (np.ones(100, np.float32) * 3, "peak"),
        (np.zeros((3, 3, 3), np.float32), "shape"),
        (np.array(["a", "b"]), "numeric"),
        (np.zeros((100, 100), np.float32), "does not look like"),
    ],
)
def test_prepare_rejects_bad_input(arr, match) -> None:
    with pytest.raises(ValueError, match=match):
        prepare(arr, 24000, 24000)


def test_audio_files(tmp_path) -> None:
    sf.write(tmp_path / "a.wav", np.zeros(2400, np.float32), 48000)
    out = load_audio(tmp_path / "a.wav", 24000)
    assert len(out) == 1200 and is_silent(out)
    (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(ValueError, match="cannot be read"):
        load_audio(tmp_path / "junk.wav", 24000)
    with pytest.raises(FileNotFoundError):
        load_audio(tmp_path / "nope.wav", 24000)
    with pytest.raises(ValueError, match="too short"):
        prepare(np.zeros(10, np.float32), 24000, 24000, min_seconds=0.1)
    with pytest.raises(ValueError, match="sample_rate"):
        prepare(np.zeros(10, np.float32), 0, 24000)
    assert to_mono_float(np.zeros(0, np.float32)).size == 0
