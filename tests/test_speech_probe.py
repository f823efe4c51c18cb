"""The spoken-answer probe: what the user's codes let a classifier recognise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moshivis_lab.config import ZERO_TOKEN
from moshivis_lab.train.speech_probe import (
    SpeechProbeConfig,
    probe_spoken_answers,
    question_codes,
    question_turns,
)
from moshivis_lab.world.shards import load_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("field", "value"),
    [("codebooks", ()), ("codebooks", (0, 0)), ("steps", 0), ("heads", 5), ("dropout", 1.0)],
)
def test_config_validation_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"SpeechProbeConfig\.{field}"):
        SpeechProbeConfig.smoke().replace(**{field: value})


def test_question_turns_and_their_codes(smoke_world) -> None:
    reader = load_split(smoke_world, "train")["speech"]
    items = question_turns(reader)
    assert items, "the smoke world has spoken chit-chat questions"
    for it in items[:5]:
        turn = next(
            t
            for t in reader.meta[it["row"]]["turns"]
            if t["speaker"] == "user" and t["start_frame"] == it["start"]
        )
        assert it["end"] == turn["end_frame"] and it["answer"]
    x = question_codes(reader, items[:4], (0, 3), 12)
    assert x.shape == (4, 2, 12) and x.min() >= 0
    g = np.asarray(reader.tokens(items[0]["row"]))
    first_user = 1 + (g.shape[0] - 1) // 2
    seg = g[first_user + 3, items[0]["start"] : items[0]["start"] + 12]
    want = np.where(seg == ZERO_TOKEN, 0, seg + 1)
    assert np.array_equal(x[0, 1, : len(seg)].numpy(), want)
    with pytest.raises(ValueError, match="user stream has"):
        question_codes(reader, items[:1], (0, 99), 12)


def test_probe_reports_accuracies_by_voice_and_topic(smoke_world, tmp_path) -> None:
    out = tmp_path / "probe.json"
    pcfg = SpeechProbeConfig.smoke().replace(steps=30)
    rep = probe_spoken_answers(smoke_world, pcfg, split="val", out_path=out, progress=False)
    assert json.loads(out.read_text())["n"] == rep["n"] > 0
    assert 0.0 <= rep["accuracy"] <= 1.0 and 0.0 <= rep["majority_accuracy"] <= 1.0
    assert rep["seen_voices_n"] + rep["heldout_voices_n"] == rep["n"]
    assert sum(t["n"] for t in rep["by_topic"].values()) == rep["n"]
    assert rep["curve"] and all(math.isfinite(c["loss"]) for c in rep["curve"])
    # the probe fits its training questions better than chance after a few steps
    assert rep["train_accuracy"] > 1.0 / rep["classes"]
    # deterministic given its seed, and the caller's torch RNG is left alone
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = probe_spoken_answers(smoke_world, pcfg, split="val", progress=False)
    assert torch.equal(torch.rand(1), before)
    assert again["accuracy"] == rep["accuracy"]
    with pytest.raises(ValueError, match="held-out split"):
        probe_spoken_answers(smoke_world, pcfg, split="train", progress=False)


def test_lm_state_probe_reads_spoken_and_text_questions(smoke_pretrained, tmp_path) -> None:
    from moshivis_lab.train.speech_probe import probe_lm_state

    with pytest.raises(ValueError, match="held-out split"):
        probe_lm_state(smoke_pretrained, split="train", progress=False)
    with pytest.raises(ValueError, match="n_train"):
        probe_lm_state(smoke_pretrained, n_train=1, progress=False)
    out = tmp_path / "lm_state.json"
    rep = probe_lm_state(smoke_pretrained, n_train=60, window=32, out_path=out, progress=False)
    assert out.exists() and rep["n"] >= 2 and rep["n_train"] <= 60
    n_hooks = len(rep["hooks"])
    assert rep["hooks"][-1] == "hook_resid_final" and n_hooks >= 2
    for kind in ("spoken", "text"):
        assert len(rep[kind]) == n_hooks
        for row in rep[kind]:
            assert 0.0 <= row["accuracy"] <= 1.0
            a = row["seen_voices"]
            assert a != a or 0.0 <= a <= 1.0
    assert 0.0 <= rep["majority_accuracy"] <= 1.0
