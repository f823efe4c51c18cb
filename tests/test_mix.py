"""The single-stage data mix: speech vs speechless samples, gluing, weights and relevance rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moshivis_lab.config import ZERO_TOKEN
from moshivis_lab.train.mix import (
    TURN_MARK,
    MixConfig,
    MixedData,
    batch_for_step,
    collate,
    mark_turns,
    prompt_tokens,
    turn_relevance,
)


def test_mix_config_validates():
    for bad in ({"p_audio": 1.5}, {"p_concat": -0.1}, {"speech_len": 4}, {"user_text_weight": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MixConfig(**bad)


def test_speechless_samples_have_zero_audio_and_answer_only_weights(smoke_world):
    data = MixedData(smoke_world, "train", MixConfig(p_audio=0.0, p_concat=0.0))
    b = batch_for_step(data, 8, seed=0, step=0)
    assert not b.is_speech.any()
    codes = b.codes.numpy()
    assert (codes[:, 1:] == ZERO_TOKEN).all(), "speechless audio rows must be the zero token"
    valid = codes[:, 0] != ZERO_TOKEN
    w = b.text_weight.numpy()
    assert (w[~valid] == 0).all()
    # user tokens weigh 0, assistant tokens 1: both occur in every sample
    for r in range(codes.shape[0]):
        vals = set(w[r][valid[r]].tolist())
        assert vals == {0.0, 1.0}
    assert (b.relevance.numpy()[valid] == 1).all()


def test_speech_samples_keep_the_recording_and_its_image(smoke_world):
    data = MixedData(smoke_world, "train", MixConfig(p_audio=1.0, p_concat=0.0, speech_len=64))
    b = batch_for_step(data, 4, seed=1, step=3)
    assert b.is_speech.all()
    codes = b.codes.numpy()
    assert codes.shape[1:] == (17, 64)
    assert (codes[:, 1:9] != ZERO_TOKEN).any(), "speech samples carry the assistant's codes"
    assert (b.image_index.numpy() < len(data.image_ids)).all()
    assert set(np.unique(b.relevance.numpy())) <= {-1, 0, 1}


def test_gluing_adds_unrelated_talk_labelled_zero(smoke_world):
    data = MixedData(smoke_world, "train", MixConfig(p_audio=0.0, p_concat=1.0, text_len=200))
    b = batch_for_step(data, 8, seed=0, step=0)
    rel = b.relevance.numpy()
    assert (rel == 0).any() and (rel == 1).any()
    sp = MixedData(smoke_world, "train", MixConfig(p_audio=1.0, p_concat=1.0, speech_len=400))
    b = batch_for_step(sp, 4, seed=0, step=0)
    assert (b.relevance.numpy() == 0).any()


def test_batches_are_a_function_of_seed_and_step(smoke_world):
    data = MixedData(smoke_world, "train", MixConfig())
    a, b = batch_for_step(data, 6, 0, 5), batch_for_step(data, 6, 0, 5)
    c = batch_for_step(data, 6, 0, 6)
    assert (a.codes == b.codes).all() and (a.image_index == b.image_index).all()
    assert a.codes.shape != c.codes.shape or not (a.codes == c.codes).all()


def test_turn_relevance_follows_turn_topics():
    meta = {
        "turns": [
            {"start_frame": 2, "topic": "greetings"},
            {"start_frame": 10, "topic": "image"},
            {"start_frame": 20, "topic": "image"},
        ]
    }
    rel = turn_relevance(meta, 30)
    assert (rel[:10] == 0).all() and (rel[10:] == 1).all()


def test_collate_pads_with_zero_token():
    s = {
        "codes": np.zeros((17, 3), np.int64),
        "text_weight": np.ones(3, np.float32),
        "relevance": np.ones(3, np.int64),
        "image": 0,
        "speech": False,
    }
    long = {
        **s,
        "codes": np.zeros((17, 5), np.int64),
        "text_weight": np.ones(5, np.float32),
        "relevance": np.ones(5, np.int64),
    }
    b = collate([s, long])
    assert b.codes.shape == (2, 17, 5)
    assert (b.codes[0, :, 3:] == ZERO_TOKEN).all()
    assert (b.text_weight[0, 3:] == 0).all() and (b.relevance[0, 3:] == -1).all()
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_packing_joins_items_of_the_same_image_within_text_len(smoke_world):
    with pytest.raises(ValueError, match="pack_items"):
        MixConfig(pack_items=0)
    mix = MixConfig(p_audio=0.0, p_concat=0.0, text_len=96, pack_items=1)
    one = MixedData(smoke_world, "train", mix)
    packed = MixedData(smoke_world, "train", mix.replace(pack_items=4))
    grew = 0
    for i in one.texts[:40]:
        a = one.text_sample(i, np.random.default_rng(i), False)
        b = packed.text_sample(i, np.random.default_rng(i), False)
        assert a["image"] == b["image"] and b["codes"].shape[1] <= 96
        n = a["codes"].shape[1]
        # the item itself comes first, unchanged; what follows is other items of its image
        assert (b["codes"][0, :n] == a["codes"][0]).all()
        assert (b["text_weight"][:n] == a["text_weight"]).all()
        if b["codes"].shape[1] > n:
            grew += 1
            image_id = one.text.meta[i]["image_id"]
            rest = b["codes"][0, n:].tolist()
            joined = [
                t
                for j in one.texts_of_image[image_id]
                if j != i
                for t in np.asarray(one.text.tokens(j))[0].tolist()
            ] + [TURN_MARK]
            assert set(rest) <= set(joined)
            assert b["text_weight"][n:].sum() > 0  # the added items' answers are trained
        assert (b["relevance"] == 1).all()
    assert grew > 10
    # one item per sample: the item alone, and no random number drawn for packing
    rng = np.random.default_rng(0)
    a = one.text_sample(one.texts[0], rng, False)
    raw = np.asarray(one.text.tokens(one.texts[0]))
    assert (a["codes"][0] == mark_turns(raw[0], raw[1])[0]).all()
    assert rng.random() == np.random.default_rng(0).random()


def test_mark_turns_closes_every_assistant_turn():
    ids = np.array([10, 11, 12, 20, 21, 13, 22])
    roles = np.array([0, 0, 0, 1, 1, 0, 1])
    out, r = mark_turns(ids, roles)
    m = TURN_MARK
    assert out.tolist() == [10, 11, 12, 20, 21, m, 13, 22, m]
    assert r.tolist() == [0, 0, 0, 1, 1, 1, 0, 1, 1]  # the marks are the assistant's
    # a user-only or empty sequence gets no mark
    assert mark_turns(np.array([5, 6]), np.array([0, 0]))[0].tolist() == [5, 6]
    assert mark_turns(np.array([], np.int64), np.array([], np.int64))[0].tolist() == []


def test_speechless_samples_close_each_answer_with_a_mark(smoke_world):
    from moshivis_lab.world.tokenizer import TextTokenizer

    data = MixedData(smoke_world, "train", MixConfig(p_audio=0.0, p_concat=1.0))
    b = batch_for_step(data, 8, seed=0, step=0)
    for row, w in zip(b.codes[:, 0].numpy(), b.text_weight.numpy(), strict=True):
        valid = row != ZERO_TOKEN
        marks = np.flatnonzero(row == TURN_MARK)
        assert len(marks) >= 2 and (w[marks] == 1).all()  # every mark is trained
        # each mark follows an assistant token and precedes the user's next turn (or the end)
        assert (w[marks[marks > 0] - 1] == 1).all()
        after = marks + 1
        after = after[(after < len(row)) & valid[np.minimum(after, len(row) - 1)]]
        assert (w[after] == 0).all()
    tok = TextTokenizer.load(smoke_world.tokenizer_path)
    assert prompt_tokens(tok, "Is it red?") == tok.encode("Is it red?")


def test_answer_and_caption_weights_scale_their_tokens_only(smoke_world):
    from moshivis_lab.train.mix import SHORT_ANSWER_TASKS

    for bad in ({"answer_weight": -1.0}, {"caption_weight": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MixConfig(**bad)
    mix = MixConfig(p_audio=0.0, p_concat=0.0, pack_items=1)
    plain = MixedData(smoke_world, "train", mix)
    heavy = MixedData(smoke_world, "train", mix.replace(answer_weight=4.0, caption_weight=0.25))
    seen = set()
    for i in plain.texts[:60]:
        a = plain.text_sample(i, np.random.default_rng(i), False)
        b = heavy.text_sample(i, np.random.default_rng(i), False)
        assert (a["codes"] == b["codes"]).all(), "weights never change the tokens"
        task = plain.text.meta[i]["task"]
        words = (a["text_weight"] > 0) & (a["codes"][0] != TURN_MARK)
        factor = 4.0 if task in SHORT_ANSWER_TASKS else 0.25 if task == "caption" else 1.0
        assert np.allclose(b["text_weight"][words], factor * a["text_weight"][words])
        assert (b["text_weight"][~words] == a["text_weight"][~words]).all()
        seen.add(task)
    assert {"caption", "vqa"} <= seen


def test_answers_first_packs_short_answers_before_the_rest(smoke_world):
    from moshivis_lab.train.mix import SHORT_ANSWER_TASKS

    mix = MixConfig(p_audio=0.0, p_concat=0.0, text_len=40, pack_items=6)
    first = MixedData(smoke_world, "train", mix.replace(pack_answers_first=True))
    plain = MixedData(smoke_world, "train", mix)
    counts = {True: 0, False: 0}
    for i in first.texts:
        n = len(first._item(i)[0])
        for data in (first, plain):
            chosen = data.companions(i, n, np.random.default_rng(i))
            short = [data.text.meta[j].get("task") in SHORT_ANSWER_TASKS for j in chosen]
            counts[data.mix.pack_answers_first] += sum(short)
            assert len(chosen) <= 5 and i not in chosen
            image = data.text.meta[i]["image_id"]
            assert all(data.text.meta[j]["image_id"] == image for j in chosen)
        # with answers first, no other item is taken while a short answer still fits: the
        # short-answer companions come first
        chosen = first.companions(i, n, np.random.default_rng(i))
        flags = [first.text.meta[j].get("task") in SHORT_ANSWER_TASKS for j in chosen]
        assert flags == sorted(flags, reverse=True)
    assert counts[True] >= counts[False] > 0


def test_samples_mark_the_assistant_positions(smoke_world):
    from moshivis_lab.train.mix import turn_speaker

    meta = {
        "turns": [
            {"start_frame": 0, "speaker": "user"},
            {"start_frame": 5, "speaker": "assistant"},
            {"start_frame": 9, "speaker": "user"},
        ]
    }
    assert turn_speaker(meta, 12).tolist() == [False] * 5 + [True] * 4 + [False] * 3
    data = MixedData(smoke_world, "train", MixConfig(p_audio=0.5, p_concat=1.0))
    b = batch_for_step(data, 8, seed=0, step=0)
    assert b.assistant.shape == b.relevance.shape and b.assistant.dtype == torch.bool
    for r in range(8):
        a = b.assistant[r].numpy()
        if bool(b.is_speech[r]):
            assert a.any() and not a.all(), "speech samples hold user and assistant turns"
        else:  # speechless: the assistant's positions are exactly the weighted ones
            assert (a == (b.text_weight[r].numpy() > 0)).all()
        assert not a[b.relevance[r].numpy() < 0].any(), "padding is nobody's"


def test_qa_sessions_are_fresh_short_answers_about_one_training_image(smoke_world):
    from moshivis_lab.world.generate import load_scenes
    from moshivis_lab.world.tokenizer import TextTokenizer

    with pytest.raises(ValueError, match="p_qa_session"):
        MixConfig(p_qa_session=1.5)
    plain = MixedData(smoke_world, "train", MixConfig(p_audio=0.0))
    with pytest.raises(ValueError, match="p_qa_session"):
        plain.qa_session(np.random.default_rng(0), False)
    mix = MixConfig(p_audio=0.0, p_concat=0.0, p_qa_session=1.0, answer_weight=3.0, pack_items=6)
    data = MixedData(smoke_world, "train", mix)
    train_ids = {sc.id for sc in load_scenes(smoke_world)["train"]}
    tok = TextTokenizer.load(smoke_world.tokenizer_path)
    b = batch_for_step(data, 6, seed=0, step=0)
    assert all(name.startswith("qa_session:") for name in data.last_ids)
    for r in range(6):
        image_id = data.last_ids[r].split(":", 1)[1]
        assert image_id in train_ids and data.image_ids[int(b.image_index[r])] == image_id
        ids = b.codes[r, 0].numpy()
        valid = ids != ZERO_TOKEN
        assert valid.sum() <= mix.text_len and (b.codes[r, 1:] == ZERO_TOKEN).all()
        w = b.text_weight[r].numpy()[valid]
        marks = ids[valid] == TURN_MARK
        n_items = int(marks.sum())
        assert 2 <= n_items <= 6, "several short answers per session"
        # answers weigh answer_weight, their closing marks 1, the user's questions 0
        assert set(w[marks].tolist()) == {1.0} and set(w[~marks].tolist()) <= {0.0, 3.0}
        text = tok.decode([int(t) for t in ids[valid] if t != TURN_MARK])
        assert "?" in text
    # a function of (seed, step): the same batch again, another one at the next step
    again = batch_for_step(data, 6, seed=0, step=0)
    assert torch.equal(again.codes, b.codes)
    assert not torch.equal(
        batch_for_step(data, 6, seed=0, step=1).codes[:, 0, :8], b.codes[:, 0, :8]
    )
    # p_qa_session = 0.5: about half the speechless samples are sessions
    half = MixedData(smoke_world, "train", mix.replace(p_qa_session=0.5))
    names = []
    for step in range(8):
        batch_for_step(half, 8, seed=0, step=step)
        names += half.last_ids
    share = np.mean([n.startswith("qa_session:") for n in names])
    assert 0.3 < share < 0.7
