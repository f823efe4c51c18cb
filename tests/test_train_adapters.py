"""Single-stage adapter training, its evaluation and the ablation runner (smoke sizes)."""

from __future__ import annotations

import json

import pytest
import torch

from moshivis_lab.train.adapters import (
    TrainConfig,
    adapters_dir,
    build_model,
    load_trained,
    lr_at,
    train_adapters,
)
from moshivis_lab.train.pretrain import load_speech_lm
from moshivis_lab.train.vis_eval import caption_f1, chance_levels, reply_correct


def test_train_config_validates():
    for bad in (
        {"steps": 0},
        {"lr": 0},
        {"grad_accum": 0},
        {"lora_rank": -1},
        {"gate_lr_scale": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=5, warmup_steps=6)


def test_lr_schedule_warms_up_then_decays():
    t = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(100, t) == pytest.approx(0.1)
    assert lr_at(50, t) < lr_at(20, t)


def test_training_touches_only_the_adapters_and_resumes(smoke_pretrained, one_torch_thread):
    cfg = smoke_pretrained
    lm_before = {k: v.clone() for k, v in load_speech_lm(cfg).state_dict().items()}
    tcfg = TrainConfig.smoke()
    # Straight run vs. a run stopped after 3 updates and resumed: same adapters.
    rep = train_adapters(cfg, tcfg, run="straight", progress=False, log=lambda *_: None)
    assert rep["finished"] and rep["step"] == tcfg.steps
    counts = rep["parameters"]
    assert counts["trainable"] == counts["total"] > 0  # exactly the adapters
    part = train_adapters(cfg, tcfg, run="resumed", progress=False, max_new_steps=3, log=print)
    assert not part["finished"] and part["step"] == 3
    train_adapters(cfg, tcfg, run="resumed", progress=False, log=lambda *_: None)
    a = load_trained(cfg, "straight").state_dict()
    b = load_trained(cfg, "resumed").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # exactly (tests/test_reliability.py: after SIGKILL)
    # The LM inside the trained model is the frozen base, bit for bit.
    model = load_trained(cfg, "straight")
    after = model.lm.state_dict()
    for k, v in lm_before.items():
        assert torch.equal(after[k], v), k
    lines = [json.loads(x) for x in (adapters_dir(cfg, "straight") / "metrics.jsonl").open()]
    assert {r["split"] for r in lines} == {"train", "val"}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)
    # A finished run is skipped; other settings in the same run dir are refused.
    again = train_adapters(cfg, tcfg, run="straight", progress=False, log=lambda *_: None)
    assert again["step"] == rep["step"]
    with pytest.raises(ValueError, match="other settings"):
        train_adapters(cfg, tcfg.replace(lr=1e-4), run="straight", progress=False)


def test_untrained_run_gives_a_clear_error(smoke_pretrained):
    with pytest.raises(FileNotFoundError, match="moshivis-lab train"):
        load_trained(smoke_pretrained, "never_trained")


def test_lora_adds_trainable_low_rank_weights(smoke_pretrained):
    from moshivis_lab.train.adapters import freeze_and_unfreeze

    model = build_model(smoke_pretrained, image_dim=64)
    plain = freeze_and_unfreeze(model, TrainConfig.smoke(), log=lambda *_: None)
    model = build_model(smoke_pretrained, image_dim=64)
    lora = freeze_and_unfreeze(model, TrainConfig.smoke().replace(lora_rank=2), log=lambda *_: None)
    assert lora["lora"] > 0
    assert lora["trainable"] == plain["trainable"] + lora["lora"]
    # The LoRA weights are in the forward pass: non-zero B changes the logits, grads flow.
    codes = torch.randint(0, 50, (1, 17, 12))
    img = torch.randn(1, 64, 64)
    before = model(codes, image_tokens=img).text_logits
    names = [n for n, _ in model.named_parameters() if "lora_B" in n]
    assert any("self_attn" in n for n in names) and any("gating" in n for n in names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    out = model(codes, image_tokens=img)
    assert not torch.allclose(before, out.text_logits)
    out.text_logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora" in n)


def test_reply_scoring_and_caption_f1():
    assert reply_correct("Yes, it is. No doubt.", "yes", "vqa/yes/no")
    assert not reply_correct("No, yes.", "yes", "vqa/yes/no")
    assert reply_correct("It is at the top right.", "top right", "vqa/position")
    assert not reply_correct("It is red. Or blue.", "blue", "vqa/colour")  # first sentence only
    assert caption_f1(["a red star"], ["a red star"]) == 1.0
    assert caption_f1(["a red star"], ["a blue circle"]) == 0.0


def test_evaluation_report_has_every_section(smoke_pretrained, one_torch_thread, evaluate_small):
    cfg = smoke_pretrained
    train_adapters(cfg, TrainConfig.smoke(), run="straight", progress=False, log=lambda *_: None)
    rep = evaluate_small(cfg, "straight")
    test = rep["test"]
    for mode in ("text_prompts", "spoken_prompts"):
        assert 0.0 <= test[mode]["vqa_all"]["accuracy"] <= 1.0
    assert rep["heldout_voices"] and all(v.startswith("user_") for v in rep["heldout_voices"])
    sk = rep["speech_kept"]
    # No image: the adapted model is the base model.
    assert sk["adapted_no_image_audio_nll"] == pytest.approx(sk["base_audio_nll"], abs=1e-6)
    assert 0.0 <= rep["gates"]["auroc"] <= 1.0
    chance = chance_levels(cfg)
    assert chance["vqa/yes/no"]["uniform"] == pytest.approx(0.5)
    assert (adapters_dir(cfg, "straight") / "eval.json").exists()


def test_ablations_write_json_and_markdown(smoke_pretrained, one_torch_thread, tmp_path):
    from moshivis_lab.train.ablate import INIT_SWEEP, AblateConfig, run_ablations

    kyutai, preset_init = INIT_SWEEP[0][0], INIT_SWEEP[1][0]
    acfg = AblateConfig(
        steps=2,
        p_audio=(0.0,),
        init=(kyutai, preset_init),
        per_type=1,
        spoken_per_type=1,
        n_speech=1,
    )
    res = run_ablations(
        smoke_pretrained, acfg, TrainConfig.smoke(), progress=False, out_dir=tmp_path
    )
    names = [r["name"] for r in res["rows"]]
    assert len(names) == 7 and "p_audio=0" in names and kyutai in names
    rows = {r["name"]: r for r in res["rows"]}
    assert (rows[kyutai]["gate_bias"], rows[kyutai]["out_proj_init"]) == (-4.0, "default")
    assert rows[preset_init].get("same_as"), "the preset's own init is the grid's default run"
    params = {r["name"]: r["trainable_parameters"] for r in res["rows"]}
    assert params["no gate, no sharing"] > params["per-layer gate, shared QKV (default)"]
    md = (tmp_path / "ablations.md").read_text()
    assert "68.2 / 64.7" in md and "p_audio" in md and "Where the adapters start" in md
