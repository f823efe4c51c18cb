"""Configs fail at construction, naming the field; presets are consistent."""

from __future__ import annotations

import dataclasses

import pytest

from moshivis_lab.config import CodecConfig, LabConfig, TokenizerConfig, WorldConfig, preset


@pytest.mark.parametrize(
    ("cls", "kw", "field"),
    [
        (WorldConfig, {"image_size": 10}, "image_size"),
        (WorldConfig, {"max_objects": 9}, "max_objects"),
        (WorldConfig, {"p_word": 1.5}, "p_word"),
        (
            WorldConfig,
            {"n_spoken_image_dialogues": 10, "n_image_dialogues": 5},
            "n_spoken_image_dialogues",
        ),
        (WorldConfig, {"pause_range_s": (1.0, 0.5)}, "pause_range_s"),
        (WorldConfig, {"n_heldout_voices": 8}, "n_heldout_voices"),
        (CodecConfig, {"kind": "wavenet"}, "kind"),
        (CodecConfig, {"frame_rate": 7.0}, "frame_rate"),
        (CodecConfig, {"cardinality": 0}, "cardinality"),
        (CodecConfig, {"subframes": 7}, "subframes"),
        (CodecConfig, {"kind": "mimi"}, "mimi_path"),
        (TokenizerConfig, {"vocab_size": 10}, "vocab_size"),
        (LabConfig, {"workers": 0}, "workers"),
    ],
)
def test_invalid_values_fail_with_the_field_named(cls, kw, field) -> None:
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}"):
        cls(**kw)


def test_presets() -> None:
    tiny = preset("tiny")
    assert tiny.codec.frame_size == 1920
    assert tiny.world.n_image_dialogues >= 5000 and tiny.world.n_chitchat_dialogues >= 2000
    assert tiny.world.n_image_text_samples >= 20000
    smoke = preset("smoke", "/tmp/x")
    assert str(smoke.world_dir).startswith("/tmp/x/smoke")
    assert CodecConfig.mimi("/weights/mimi").cardinality == 2048
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_replace_revalidates() -> None:
    cfg = LabConfig.tiny()
    with pytest.raises(ValueError, match="workers"):
        cfg.replace(workers=-1)
    assert dataclasses.replace(cfg.world, seed=3).seed == 3
