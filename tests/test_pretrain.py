"""Speech-LM pretraining and its evaluation on a (reduced) smoke world built once per module."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from moshivis_lab.config import ZERO_TOKEN, LabConfig, LMConfig
from moshivis_lab.model.checkpoint import load_moshi
from moshivis_lab.train.pretrain import (
    PretrainConfig,
    batch_for_step,
    crop_grid,
    lm_config_for,
    load_speech_lm,
    lr_at,
    make_optimizer,
    pretrain_speech,
    speech_lm_dir,
    train_step,
)
from moshivis_lab.train.speech_eval import answer_found, evaluate_speech_lm, words_of
from moshivis_lab.world.shards import load_split


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> LabConfig:
    """A smoke world with a quickly fitted codec (the code paths are the tiny preset's)."""
    from moshivis_lab.pipeline import build_data

    cfg = LabConfig.smoke(tmp_path_factory.mktemp("pretrain"))
    cfg = cfg.replace(codec=dataclasses.replace(cfg.codec, fit_seconds=40.0, kmeans_iters=4))
    build_data(cfg, progress=False)
    return cfg


def _tcfg(**kw: object) -> PretrainConfig:
    return PretrainConfig.smoke().replace(**kw)


def _small_lm(cfg: LabConfig) -> LMConfig:
    """A very small Moshi (same code paths) so the tests stay fast on 2 cores."""
    base = lm_config_for(cfg)
    return dataclasses.replace(
        base,
        dim=64,
        num_layers=2,
        num_heads=4,
        depformer_dim=32,
        depformer_num_layers=1,
        depformer_num_heads=2,
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("batch_size", -1),
        ("seq_len", 0),
        ("lr", 0.0),
        ("warmup_steps", 100),
        ("min_lr_ratio", 1.5),
        ("weight_decay", -0.1),
        ("beta2", 1.0),
        ("grad_clip", 0.0),
        ("minutes", 0.0),
        ("seed", -1),
        ("listen_batch_size", -1),
        ("listen_len", 4),
    ],
)
def test_config_validation_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"PretrainConfig\.{field}"):
        PretrainConfig.smoke().replace(**{field: value})


def test_lr_schedule_warmup_then_cosine() -> None:
    t = PretrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, t) == pytest.approx(1e-4)
    assert lr_at(9, t) == pytest.approx(1e-3)
    assert lr_at(10, t) == pytest.approx(1e-3)
    assert lr_at(100, t) == pytest.approx(1e-4)
    lrs = [lr_at(s, t) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_crop_pads_with_zero_token() -> None:
    rng = np.random.default_rng(0)
    g = np.arange(17 * 5).reshape(17, 5)
    out = crop_grid(g, 8, rng)
    assert out.shape == (17, 8)
    assert (out[:, :5] == g).all() and (out[:, 5:] == -1).all()
    long = np.arange(17 * 50).reshape(17, 50)
    c = crop_grid(long, 8, rng)
    start = int(c[0, 0])
    assert (c == long[:, start : start + 8]).all()


def test_answer_matching() -> None:
    assert words_of("Twelve, comes first!") == ["twelve", "comes", "first"]
    assert answer_found("I think twelve.", ["twelve"])
    assert not answer_found("twelves", ["twelve"])
    assert answer_found("I love ice cream", ["ice cream"])


def test_loss_decreases_on_repeated_batch(world: LabConfig) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    from moshivis_lab.model.lm import MoshiLM

    model = MoshiLM(_small_lm(world))
    t = _tcfg(lr=1e-2)
    opt = make_optimizer(model, t)
    batch = batch_for_step(load_split(world, "train")["speech"], t, 0)
    losses = [train_step(model, opt, batch, 1e-2, 1.0)["loss"] for _ in range(8)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_metrics_checkpoint_and_resume_match_uninterrupted(world: LabConfig) -> None:
    t = _tcfg(steps=4, ckpt_interval=2, eval_interval=2)
    out = speech_lm_dir(world)
    shutil.rmtree(out, ignore_errors=True)
    full = pretrain_speech(world, t, progress=False, lm_cfg=_small_lm(world))
    assert full["finished"] and full["step"] == 4
    ref = load_moshi(out / "model.safetensors").state_dict()
    shutil.rmtree(out)

    part = pretrain_speech(world, t, progress=False, max_new_steps=3, lm_cfg=_small_lm(world))
    assert part["step"] == 3 and not part["finished"]
    assert json.loads((out / "state.json").read_text())["step"] == 3
    assert not (out / "model.safetensors").exists()
    done = pretrain_speech(world, t, progress=False, lm_cfg=_small_lm(world))
    assert done["finished"] and done["step"] == 4

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        for k in ("loss", "text_loss", "audio_loss", "lr", "tokens_per_s", "elapsed_s"):
            assert math.isfinite(r[k])
    assert any(r["split"] == "val" for r in rows)

    got = load_speech_lm(world).state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k

    # A finished run is skipped (no new metrics); other settings are refused.
    n = len(rows)
    again = pretrain_speech(world, t, progress=False, lm_cfg=_small_lm(world))
    assert again["finished"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == n
    with pytest.raises(ValueError, match="other settings"):
        pretrain_speech(world, t.replace(lr=1e-4), progress=False, lm_cfg=_small_lm(world))


def test_evaluate_speech_lm_reports_finite_numbers(world: LabConfig) -> None:
    if not (speech_lm_dir(world) / "model.safetensors").exists():
        pretrain_speech(world, _tcfg(steps=2), progress=False, lm_cfg=_small_lm(world))
    model = load_speech_lm(world)
    path = speech_lm_dir(world) / "eval_test.json"
    rep = evaluate_speech_lm(
        world, model, split="val", n_dialogues=4, n_f0=1, extra_frames=8, out_path=path
    )
    nll = rep["nll"]
    for k in ("text_nll", "text_unigram_nll", "audio_nll_mean", "audio_unigram_nll_mean"):
        assert math.isfinite(nll[k]) and nll[k] > 0
    assert len(nll["audio_nll_per_codebook"]) == 8
    assert len(nll["audio_unigram_nll_per_codebook"]) == 8
    qa = rep["qa"]
    assert qa["n"] >= 1
    assert 0.0 <= qa["accuracy"] <= 1.0
    assert {"generated_f0_median", "reference_f0_median", "ratio"} <= set(rep["f0"])
    assert math.isfinite(rep["f0"]["reference_f0_median"])
    assert json.loads(path.read_text())["split"] == "val"
    with pytest.raises(ValueError, match="split"):
        evaluate_speech_lm(world, model, split="train")


def test_cli_has_pretrain_speech() -> None:
    from typer.testing import CliRunner

    from moshivis_lab.cli import app

    res = CliRunner().invoke(app, ["pretrain-speech", "--help"])
    assert res.exit_code == 0
    assert "--minutes" in res.output and "--steps" in res.output


def test_turn_crops_start_just_before_a_user_turn():
    from moshivis_lab.train.pretrain import user_turn_starts

    g = np.arange(17 * 300).reshape(17, 300)
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = crop_grid(g, 64, rng, starts=[100, 200])
        start = int(c[0, 0])
        assert 92 <= start <= 100 or 192 <= start <= 200
    # A start too close to the end is clamped so the crop stays full.
    assert crop_grid(g, 64, rng, starts=[290])[0, -1] == 299
    meta = {
        "turns": [
            {"speaker": "user", "start_frame": 5},
            {"speaker": "assistant", "start_frame": 30},
            {"speaker": "user", "start_frame": 60},
        ]
    }
    assert user_turn_starts(meta) == [5]  # the last user turn gets no answer


def test_text_only_batches_are_dialogue_text_with_zero_audio(world: LabConfig) -> None:
    from moshivis_lab.train.pretrain import TextCorpus, text_batch_for_step

    tcfg = PretrainConfig.smoke()
    corpus = TextCorpus(world, "train")
    b = text_batch_for_step(corpus, tcfg, 0)
    assert b.shape[0] == tcfg.text_batch_size and b.shape[1] == 17 and b.shape[2] <= tcfg.text_len
    assert (b[:, 1:] == ZERO_TOKEN).all()
    assert (b[:, 0, 0] >= 0).all()  # every row starts with a real token
    assert torch.equal(b, text_batch_for_step(corpus, tcfg, 0))


def test_qa_turn_starts_are_the_users_checkable_questions() -> None:
    from moshivis_lab.train.pretrain import qa_turn_starts

    meta = {
        "qa": [
            {"question": "What is two plus two?", "asker": "user", "topic": "arithmetic"},
            {"question": "What colour is the star?", "asker": "user", "topic": "image"},
            {"question": "What is my name?", "asker": "assistant", "topic": "greetings"},
        ],
        "turns": [
            {"speaker": "user", "text": "Hi there.", "start_frame": 2},
            {"speaker": "user", "text": "what is two plus two", "start_frame": 40},
            {"speaker": "user", "text": "What colour is the star?", "start_frame": 80},
            {"speaker": "assistant", "text": "What is my name?", "start_frame": 90},
        ],
    }
    assert qa_turn_starts(meta) == [40]  # not the image question, not the assistant's
    assert qa_turn_starts({"turns": meta["turns"]}) == []


def test_qa_crops_and_chat_text_follow_their_shares(world: LabConfig) -> None:
    from moshivis_lab.train.pretrain import (
        TextCorpus,
        batch_for_step,
        batch_ids_for_step,
        qa_index,
        sample_batch,
    )

    train = load_split(world, "train")["speech"]
    qa = qa_index(train)
    assert qa, "the smoke world has chit-chat questions"
    rng = np.random.default_rng(0)
    b = sample_batch(train, 6, 16, rng, p_turn_crop=0.0, p_qa_crop=1.0, qa=qa)
    assert b.shape == (6, 17, 16)
    tcfg = _tcfg(p_qa_crop=1.0, seq_len=16)
    ids = batch_ids_for_step(train, tcfg, 3, qa=qa)
    qa_ids = {train.meta[i]["id"] for i, _ in qa}
    assert len(ids) == tcfg.batch_size and set(ids) <= qa_ids
    assert torch.equal(batch_for_step(train, tcfg, 3, qa), batch_for_step(train, tcfg, 3))
    # a crop of a question's dialogue starts 0-8 frames before one of its questions
    for i, starts in qa:
        frames = np.broadcast_to(
            np.arange(train.tokens(i).shape[1]), (17, train.tokens(i).shape[1])
        )
        if frames.shape[1] > 16 + max(starts):
            first = int(crop_grid(frames, 16, rng, starts)[0, 0])
            assert any(0 <= s - first <= 8 for s in starts)
    corpus = TextCorpus(world, "train")
    assert corpus.chat and set(corpus.picks(20, np.random.default_rng(1), 1.0)) <= set(corpus.chat)
    with pytest.raises(ValueError, match="p_qa_crop"):
        _tcfg(p_qa_crop=1.5)
    with pytest.raises(ValueError, match="chat_text_share"):
        _tcfg(chat_text_share=-0.1)


def test_listen_batches_are_short_crops_at_questions(world: LabConfig) -> None:
    from moshivis_lab.model.lm import MoshiLM
    from moshivis_lab.train.pretrain import batch_ids_for_step, listen_batch_for_step, qa_index

    train = load_split(world, "train")["speech"]
    qa = qa_index(train)
    tcfg = _tcfg(listen_batch_size=3, listen_len=16)
    lb = listen_batch_for_step(train, tcfg, 2, qa)
    assert lb is not None and lb.shape == (3, 17, 16)
    assert torch.equal(lb, listen_batch_for_step(train, tcfg, 2))  # a function of (seed, step)
    assert not torch.equal(lb, listen_batch_for_step(train, tcfg, 3, qa))
    assert listen_batch_for_step(train, _tcfg(listen_batch_size=0), 2, qa) is None
    # the ids name the long crops first, then the listening crops (all question dialogues)
    ids = batch_ids_for_step(train, tcfg, 2, qa=qa)
    qa_ids = {train.meta[i]["id"] for i, _ in qa}
    assert len(ids) == tcfg.batch_size + 3 and set(ids[tcfg.batch_size :]) <= qa_ids
    # each crop is a window of its dialogue's grid starting 0-8 frames before a question
    rows = [i for i, _ in qa]
    for b in range(3):
        found = False
        for i, starts in qa:
            g = torch.from_numpy(np.array(train.tokens(i)))
            for s in starts:
                for first in range(max(s - 8, 0), s + 1):
                    w = g[:, first : first + 16]
                    if w.shape[1] == 16 and torch.equal(w, lb[b]):
                        found = True
        assert found, f"listening crop {b} is not a window at a question of {rows}"
    with pytest.raises(ValueError, match="listen_batch_size=0"):
        listen_batch_for_step(train, tcfg, 0, qa=[])
    # its whole loss joins the step's
    model = MoshiLM(_small_lm(world))
    opt = make_optimizer(model, tcfg)
    parts = train_step(model, opt, batch_for_step(train, tcfg, 0), 1e-3, 1.0, listen_batch=lb)
    assert math.isfinite(parts["listen_loss"]) and parts["listen_loss"] > 0


def test_neutral_new_fields_leave_run_keys_alone() -> None:
    from moshivis_lab.artefacts import KEY_NEUTRAL_FIELDS, config_hash, trained_settings

    t = PretrainConfig.tiny()
    assert t.listen_batch_size == KEY_NEUTRAL_FIELDS["listen_batch_size"]
    old = {
        k: v for k, v in trained_settings(t).items() if k not in ("listen_batch_size", "listen_len")
    }
    assert config_hash(trained_settings(t)) == config_hash(old)  # as keyed before the fields
    on = t.replace(batch_size=4, listen_batch_size=8)
    assert config_hash(trained_settings(on)) != config_hash(
        trained_settings(t.replace(batch_size=4))
    )
    # nested configs too (an adapter run's settings hold its XAConfig)
    from moshivis_lab.config import XAConfig

    xa = XAConfig(image_dim=8)
    plain = {k: v for k, v in dataclasses.asdict(xa).items() if k != "pool_tokens"}
    assert config_hash({"xa": xa}) == config_hash({"xa": plain})
    assert config_hash(xa) != config_hash(dataclasses.replace(xa, pool_tokens=3))
