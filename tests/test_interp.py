"""Gates, cross-attention maps and attributions on a smoke-trained MoshiVis (interp/ and viz/interp)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moshivis_lab.interp import attention as A
from moshivis_lab.interp import attribution as T
from moshivis_lab.interp import cache as C
from moshivis_lab.interp import gates as G
from moshivis_lab.viz import interp as V


@pytest.fixture(scope="module")
def trained(smoke_pretrained, one_torch_thread):
    """A smoke adapter run (6 updates), its model, encoder and tokenizer."""
    from moshivis_lab.train.adapters import TrainConfig, load_trained, train_adapters
    from moshivis_lab.vision.pretrain import load_vision_encoder
    from moshivis_lab.world.tokenizer import TextTokenizer

    cfg = smoke_pretrained
    tcfg = TrainConfig.smoke().replace(threads=1)
    train_adapters(cfg, tcfg, run="interp", progress=False, log=lambda *_: None)
    torch.manual_seed(0)
    model = load_trained(cfg, "interp")
    return cfg, model, load_vision_encoder(cfg), TextTokenizer.load(cfg.tokenizer_path)


@pytest.fixture(scope="module")
def question(trained):
    """One single-object test question, its codes, answer steps and image tokens."""
    cfg, _, enc, tok = trained
    items = A.pointing_items(cfg, "test")
    assert items, "the smoke world has single-object questions"
    it = items[0]
    codes, steps = A.qa_codes(tok, it.question, it.answer)
    return it, codes, steps, C.image_tokens_for(cfg, [it.image_id], enc)


# ---------------------------------------------------------------------- cache and hooks


def test_every_hook_is_documented_once(trained):
    _, model, _, _ = trained
    infos = C.describe_hooks(model)
    assert [h.name for h in infos] == model.hook_names()
    assert {h.pattern for h in infos} <= set(C.HOOK_DOCS)
    assert all(h.description and h.shape.startswith("[") for h in infos)
    assert C.hook_pattern_of("temporal.layers.3.cross_attention.hook_pattern") == (
        "temporal.layers.{i}.cross_attention.hook_pattern"
    )
    assert "hook_pattern" in C.hooks_table(model)
    with pytest.raises(ValueError, match="no pattern"):
        C.hook_pattern_of("nonsense.hook")
    with pytest.raises(TypeError, match="MoshiVis or MoshiLM"):
        C.describe_hooks(torch.nn.Linear(2, 2))


def test_run_with_cache_on_a_batch_and_while_streaming(trained):
    from moshivis_lab.train.image_tokens import image_table
    from moshivis_lab.train.mix import MixConfig, MixedData, batch_for_step

    cfg, model, enc, _ = trained
    data = MixedData(cfg, "val", MixConfig(p_audio=0.5, p_concat=1.0, speech_len=32, text_len=32))
    table = image_table(cfg, data.image_ids, enc, "val", progress=False)
    batch = batch_for_step(data, 2, 0, 0)
    out, cache = C.run_with_cache(model, batch, "*.cross_attention.hook_gate", table=table)
    assert len(cache) == len(model.cfg.layers)
    for k, i in enumerate(model.cfg.layers):
        g = cache[f"temporal.layers.{i}.cross_attention.hook_gate"]
        assert g.device.type == "cpu" and not g.requires_grad
        # The output's gates are the channel mean of the hooked per-channel gates.
        torch.testing.assert_close(g.mean(-1), out.gates[:, k].float().cpu())
    with pytest.raises(ValueError, match="no hook point"):
        C.run_with_cache(model, batch, "nope.hook", table=table)
    with pytest.raises(ValueError, match="integer"):
        C.run_with_cache(model, torch.zeros(3), None)
    # Streaming: each step fires the hooks with T = 1.
    name = f"temporal.layers.{model.cfg.layers[-1]}.cross_attention.hook_gate"
    kv = model.encode_image(table[:1])
    user = batch.codes[:1, 1 + model.lm.cfg.dep_q :, :5]
    with torch.no_grad(), C.caching(model, name) as steps, model.streaming(1):
        for j in range(5):
            model.step(user[:, :, j], kv)
    assert len(steps[name]) == 5
    assert steps.stacked(name).shape[:2] == (1, 5)
    assert not model.hook_points()[name].active  # removed on exit


# ---------------------------------------------------------------------- gates


def test_gate_traces_segments_and_auroc(trained):
    cfg, model, enc, tok = trained
    d = G.spoken_dialogue(cfg, "val", 0, chat=0, chat_first=True)
    assert d.relevance[: d.switch].max() == 0 and d.relevance[d.switch :].max() == 1
    img = C.image_tokens_for(cfg, [d.image_id], enc)
    tr = G.gate_trace(model, d, img, channels=True, tokenizer=tok)
    assert tr.gates.shape == (len(model.cfg.layers), d.length)
    assert tr.channels is not None and np.allclose(tr.channels.mean(-1), tr.gates, atol=1e-6)
    assert np.allclose(tr.score(2), tr.gates[-2:].mean(0))
    assert len(tr.tokens or []) == d.length
    segs = G.segment_trace(tr, "relevance")
    assert [s.label for s in segs] == ["unrelated", "image"]
    first_image_turn = next(t.start for t in d.turns if t.topic == "image")
    assert d.switch <= first_image_turn  # the image dialogue's lead-in silence counts as unrelated
    assert segs[0].end == first_image_turn and segs[1].end == d.length
    assert {s.label for s in G.segment_trace(tr, "speaker")} == {"user", "assistant"}
    td = G.text_dialogue(cfg, "val", 0, chat=0, chat_first=False, tokenizer=tok)
    ttr = G.gate_trace(model, td, img)
    summary = G.segment_summary([tr, ttr], "topic")
    assert set(summary) == {"image", "unrelated"}
    prof = G.switch_profile([tr, ttr], 3, 3)
    assert prof.n_into == 1 and prof.n_out == 1 and prof.into_image.shape == (6,)
    with pytest.raises(ValueError, match="by must be"):
        G.segment_trace(tr, "colour")
    with pytest.raises(ValueError, match="needs an image"):
        G.gate_traces(model, d.codes, None)
    res = G.relevance_auroc(model, cfg, n_batches=1, batch_size=4, encoder=enc)
    assert 0.0 <= res.auroc <= 1.0 or np.isnan(res.auroc)
    assert set(res.per_layer) == set(model.cfg.layers)


def test_gate_zero_is_the_base_model_and_interventions_report_changes(trained, question):
    from moshivis_lab.train.vis_eval import stream_replies, text_replies

    cfg, model, _, tok = trained
    it, codes, _, img = question
    c = torch.from_numpy(codes)[None]
    with torch.no_grad():
        base = model(c)
        with G.force_gates(model, 0.0):
            zero = model(c, image_tokens=img)
        with G.force_gates(model, scale=3.0, layers=model.cfg.layers[-1]):
            scaled = model(c, image_tokens=img)
    assert torch.equal(base.text_logits, zero.text_logits)
    assert not torch.equal(base.text_logits, scaled.text_logits)
    assert all(a.gate_override is None for a in model.adapters)  # restored
    prompts = [it.question, "What is in the picture?"]
    imgs = img.expand(2, -1, -1)
    res = G.compare_text_replies(
        model, tok, prompts, imgs, [G.GateIntervention(value=0.0), G.GateIntervention(value=1.0)]
    )
    assert res.conditions["g=0"].replies == text_replies(model, tok, prompts, None)
    assert set(res.summary()) == {"g=0", "g=1"}
    shift = G.logit_shift(model, codes, img, [G.GateIntervention(scale=1.0)])
    assert np.nanmax(shift.kl["g*1"]) < 1e-6
    # Streaming: gate 0 streams exactly what the model streams with no image.
    user = np.random.default_rng(0).integers(0, model.lm.cfg.card, (1, model.n_user, 6))
    sres = G.compare_stream_replies(
        model, user, img, [G.GateIntervention(value=0.0)], tokenizer=tok
    )
    text0, audio0 = stream_replies(model, user, None)
    eff = sres.conditions["g=0"]
    assert np.array_equal(eff.text_tokens, text0) and np.array_equal(eff.audio_codes, audio0)
    assert eff.audio_changed is not None and len(eff.audio_changed) == 1
    with pytest.raises(ValueError, match="exactly one"):
        G.GateIntervention(value=0.0, scale=2.0)
    with pytest.raises(ValueError, match="no cross-attention"):
        with G.force_gates(model, 0.0, layers=[99]):
            pass
    with pytest.raises(TypeError, match="MoshiVis"):
        G.force_gates(model.lm, 0.0)


# ---------------------------------------------------------------------- attention


def test_attention_maps_eager_path_and_pixel_mapping(trained, question):
    _, model, enc, _ = trained
    _, codes, steps, img = question
    check = A.check_eager(model, codes, img)
    assert check.ok, check
    maps = A.cross_attention_maps(model, codes, img)
    n = enc.num_tokens
    assert maps.weights.shape == (len(model.cfg.layers), model.cfg.xa_heads, codes.shape[1], n)
    np.testing.assert_allclose(maps.weights.sum(-1), 1.0, atol=1e-5)
    side = enc.token_grid_side()
    assert maps.side == side and maps.grid(steps=steps).shape == (side, side)
    assert np.isclose(maps.grid(steps=steps).sum(), 1.0, atol=1e-5)
    assert maps.pixels(50, 70, layer=model.cfg.layers[0]).shape == (50, 70)
    for i in (0, side + 1, n - 1):
        assert A.patch_box(i, side, 224, 160) == pytest.approx(enc.token_box(i, 224, 160))
    # Nearest upsampling puts each patch's value exactly on the pixels of its box.
    grid = np.arange(side * side, dtype=float).reshape(side, side)
    up = A.upsample(grid, 96, 80, "nearest")
    x0, y0, x1, y1 = enc.token_box(side + 1, 80, 96)
    assert (up[int(np.ceil(y0)) : int(y1), int(np.ceil(x0)) : int(x1)] == side + 1).all()
    with pytest.raises(ValueError, match="one sample"):
        A.cross_attention_maps(model, np.stack([codes, codes]), img)
    with pytest.raises(ValueError, match="need an image"):
        A.cross_attention_maps(model, codes, None)


def test_pointing_game_baseline_and_hits(trained):
    cfg, model, enc, tok = trained
    assert A.box_area_share((0, 0, 32, 16), 64, 64) == pytest.approx(0.125)
    assert A.box_area_share((-10, 60, 20, 80), 64, 64) == pytest.approx(20 * 4 / 64**2)
    assert A.patch_centre_share((0, 0, 32, 32), 2, 64, 64) == pytest.approx(0.25)
    assert A.in_box((10, 10), (10, 10, 11, 11)) and not A.in_box((11, 10), (10, 10, 11, 11))
    g = np.zeros((4, 4))
    g[1, 2] = 1
    assert A.peak_point(g, 64, 64) == (40.0, 24.0)
    with pytest.raises(ValueError, match="x1 > x0"):
        A.box_area_share((5, 5, 5, 9), 64, 64)
    items = A.pointing_items(cfg, "test", per_type=2)
    assert items and all(it.answer_type.startswith("vqa/") for it in items)
    res = A.pointing_game(model, cfg, items, tokenizer=tok, encoder=enc, progress=False)
    assert res.hits.shape == (len(items), len(model.cfg.layers))
    assert res.baseline == pytest.approx(np.mean([it.baseline for it in items]))
    assert 0 < res.baseline < 1 and set(res.per_layer) == set(model.cfg.layers)
    assert not (res.hits & res.other_hits).any()
    # A map that peaks in the box always hits: check the scorer on the item's own box.
    it = items[0]
    side = enc.token_grid_side()
    cx, cy = (it.box[0] + it.box[2]) / 2, (it.box[1] + it.box[3]) / 2
    g = np.zeros((side, side))
    g[int(cy * side / it.image_size), int(cx * side / it.image_size)] = 1
    assert A.in_box(A.peak_point(g, it.image_size, it.image_size), it.box) or (
        A.patch_centre_share(it.box, side, it.image_size, it.image_size) == 0
    )
    assert "per_layer" in res.to_json()


# ---------------------------------------------------------------------- attribution


def test_integrated_gradients_are_complete_and_compared_with_attention(trained, question):
    cfg, model, enc, tok = trained
    it, codes, steps, img = question
    target = T.target_of(tok, it.question, it.answer)
    assert target.step == steps[0] and target.token == codes[0, steps[0]]
    a = T.attribute_image(model, target, img, kind="image_tokens", n_steps=256)
    assert a.values.shape == tuple(img.shape[1:])
    assert a.gap < 0.05, (a.gap, a.f_input, a.f_baseline, a.delta)
    assert a.total == pytest.approx(
        a.f_input - a.f_baseline, abs=0.05 * abs(a.f_input - a.f_baseline)
    )
    side = enc.token_grid_side()
    assert a.map.shape == (side, side)
    from moshivis_lab.interp.cache import load_image

    p = T.attribute_image(
        model, target, load_image(cfg, it.image_id), encoder=enc, kind="pixels", n_steps=16
    )
    assert p.values.shape == (3, enc.image_size, enc.image_size) and p.map.shape == (side, side)
    maps = A.cross_attention_maps(model, codes, img, steps=[target.step])
    agree = T.attention_agreement(a, maps)
    assert set(agree) == {f"layer {i}" for i in model.cfg.layers} | {"all"}
    assert all(-1 <= v <= 1 for v in agree.values() if np.isfinite(v))
    assert T.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert np.isnan(T.spearman([1, 1, 1], [1, 2, 3]))
    d = G.spoken_dialogue(cfg, "test", 0, chat=None)
    st, turn, prev = T.spoken_target(d)
    au = T.attribute_user_audio(model, st, C.image_tokens_for(cfg, [d.image_id], enc), n_steps=32)
    assert au.map.shape == (st.step + 1,)
    assert au.gap < 0.05, (au.gap, au.f_input, au.f_baseline, au.delta)
    with pytest.raises(ValueError, match="encoder"):
        T.attribute_image(model, target, img, kind="pixels")
    with pytest.raises(ValueError, match="no user audio"):
        T.attribute_user_audio(model, target, img)


# ---------------------------------------------------------------------- figures


def test_figures_hold_the_expected_traces():
    rng = np.random.default_rng(0)
    f = V.gate_heatmap_figure(rng.random((4, 12)), tokens=list("abcdefghijkl"), step=3)
    assert [t.type for t in f.data] == ["heatmap"] and f.data[0].z.shape == (4, 12)
    assert len(f.layout.shapes) == 1  # the step marker
    with pytest.raises(ValueError, match="2-D"):
        V.gate_heatmap_figure(np.zeros(5))
    with pytest.raises(ValueError, match="tokens"):
        V.gate_heatmap_figure(np.zeros((2, 3)), tokens=["a"])
    img = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    f = V.attention_overlay_figure(img, rng.random((5, 5)), box=(3, 4, 20, 30), title="t")
    assert [t.type for t in f.data] == ["image", "heatmap", "scatter"]
    assert f.data[1].z.shape == (40, 60) and len(f.layout.shapes) == 1
    with pytest.raises(ValueError, match="uint8"):
        V.attention_overlay_figure(np.zeros((4, 4)), np.ones((2, 2)))
    with pytest.raises(ValueError, match="x1 > x0"):
        V.attention_overlay_figure(img, np.ones((2, 2)), box=(5, 5, 1, 1))
    rel = np.r_[np.zeros(6), np.ones(6)].astype(int)
    turns = [G.Turn(0, 6, "user", "weather"), G.Turn(6, 12, "assistant", "image")]
    f = V.gate_trace_figure(
        rng.random(12), relevance=rel, turns=turns, layer_gates=rng.random((3, 12))
    )
    assert sum(t.type == "scatter" for t in f.data) == 3 + 1 + 2
    f = V.attention_grid_figure([img, img], rng.random((2, 3, 4, 4)), boxes=[None, (1, 1, 9, 9)])
    assert len(f.data) == 2 * 2 * 3 and len(f.layout.shapes) == 3
    f = V.pointing_game_figure(
        {0: 0.2, 1: 0.4}, 0.05, all_layers=0.3, other_object={0: 0.1, 1: 0.2}
    )
    assert [t.type for t in f.data] == ["bar", "bar", "scatter"] and len(f.data[0].x) == 3
    with pytest.raises(ValueError, match="share"):
        V.pointing_game_figure([0.1], 2.0)
    f = V.attribution_figure(img, {"attention": rng.random((4, 4)), "IG": rng.random((4, 4))})
    assert [t.type for t in f.data] == ["image", "image", "heatmap", "image", "heatmap"]
    res = G.InterventionResult(
        ["q"],
        G.ConditionEffect(["a"], [False], [0.0], [[]]),
        {"g=0": G.ConditionEffect(["b"], [True], [1.0], [[("replace", "a", "b")]])},
        "text",
    )
    f = V.intervention_figure(res)
    assert [t.type for t in f.data] == ["bar"] and list(f.data[0].y) == [1.0]
    f = V.audio_attribution_figure(rng.normal(size=10), turns=turns[:1], target_step=8)
    assert f.data[0].type == "bar"
