"""MoshiVis adapters: config, counts, gates, sharing, K/V once, streaming, hooks, checkpoints."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moshivis_lab.config import LMConfig, MoshiVisConfig, XAConfig
from moshivis_lab.model import (
    ImageKV,
    MoshiLM,
    MoshiVis,
    adapter_parameters,
    count_adapter_parameters,
    count_parameters,
    encoder_keys,
    freeze_for_adapters,
    load_adapters,
    load_moshivis,
    load_moshivis_weights,
    read_moshivis_config,
    run_with_cache,
    save_adapters,
    save_moshi,
    save_moshivis,
)
from moshivis_lab.model.checkpoint import to_released

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LM = dataclasses.replace(
    LMConfig.tiny(),
    dim=64,
    num_layers=3,
    num_heads=4,
    text_card=300,
    card=64,
    context=16,
    depformer_dim=32,
    depformer_num_layers=2,
    depformer_num_heads=2,
)
IMAGE_DIM, N_IMAGE = 24, 5


def vis_cfg(**xa) -> MoshiVisConfig:
    """Kyutai's init unless told otherwise (the image matters from the first step)."""
    return MoshiVisConfig.tiny(
        LM, image_dim=IMAGE_DIM, **{"gate_bias": -4.0, "out_proj_init": "default", **xa}
    )


def build(seed: int = 0, lm: MoshiLM | None = None, **xa) -> MoshiVis:
    torch.manual_seed(seed)
    return MoshiVis(vis_cfg(**xa), lm).eval()


def random_codes(b: int = 2, t: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, LM.card, (b, LM.num_codebooks, t), generator=g)
    codes[:, 0] = torch.randint(0, LM.text_card, (b, t), generator=g)
    return codes


def image(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, N_IMAGE, IMAGE_DIM, generator=torch.Generator().manual_seed(seed))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality, NaN fills included."""
    return torch.equal(a.nan_to_num(nan=123.0), b.nan_to_num(nan=123.0))


@pytest.fixture(scope="module")
def base() -> MoshiLM:
    torch.manual_seed(0)
    return MoshiLM(LM).eval()


@pytest.fixture(scope="module")
def model(base: MoshiLM) -> MoshiVis:
    torch.manual_seed(1)
    return MoshiVis(vis_cfg(), copy.deepcopy(base)).eval()


def stream(model, user: torch.Tensor, image_kv=None, seed: int = 0):
    """Outputs, text logits, audio logits and gates per call over user frames [B, n_user, N]."""
    outs, text, audio, gates = [], [], [], []
    with torch.no_grad(), model.streaming(user.shape[0], seed=seed) as st:
        for j in range(user.shape[2]):
            kw = {} if image_kv is None else {"image_kv": image_kv}
            outs.append(model.step(user[:, :, j], **kw))
            text.append(st.text_logits)
            audio.append(st.audio_logits)
            gates.append(getattr(model, "last_gates", None))
    return outs, text, audio, gates


# ---------------------------------------------------------------- config


def test_config_validation_and_presets() -> None:
    for bad, match in [
        (dict(gating="softmax"), "XAConfig.gating"),
        (dict(sharing="q"), "XAConfig.sharing"),
        (dict(gating="none", gate_shared=True), "gate_shared"),
        (dict(xa_layers=()), "at least one layer"),
        (dict(xa_layers=(1, 1)), "distinct"),
        (dict(xa_layers=(-1,)), "distinct"),
        (dict(xa_start=-1), "xa_start"),
        (dict(image_dim=0), "image_dim"),
        (dict(num_heads=0), "num_heads"),
        (dict(gate_bias=float("nan")), "gate_bias"),
    ]:
        with pytest.raises(ValueError, match=match):
            XAConfig(**bad)
    with pytest.raises(ValueError, match=r"layers \[3\] do not exist"):
        MoshiVisConfig(lm=LM, xa=XAConfig(xa_layers=(0, 3)))
    with pytest.raises(ValueError, match="must divide"):
        MoshiVisConfig(lm=LM, xa=XAConfig(num_heads=3))
    assert XAConfig(xa_layers=[2, 0]).xa_layers == (0, 2)
    real = MoshiVisConfig.moshika_vis()
    assert (real.xa.xa_start, real.xa.image_dim, real.xa_heads, real.gate_hidden) == (
        16,
        1152,
        32,
        512,
    )
    assert (real.xa.gating, real.xa.sharing, real.xa.gate_shared) == (
        "conditional_sigmoid",
        "qkv",
        False,
    )
    assert real.layers == tuple(range(32))
    tiny = vis_cfg(sharing="kv", xa_layers=(1,))
    assert tiny.xa.xa_start == 0 and tiny.xa.num_heads == LM.num_heads and tiny.layers == (1,)
    assert MoshiVisConfig(**tiny.to_dict()) == tiny
    with pytest.raises(ValueError, match="lm.cfg differs"):
        MoshiVis(MoshiVisConfig.tiny(image_dim=8), MoshiLM(LM))


# ---------------------------------------------------------------- parameter counts


def test_moshika_vis_counts_on_meta() -> None:
    with torch.device("meta"):
        model = MoshiVis(MoshiVisConfig.moshika_vis())
    counts = count_adapter_parameters(model)
    assert counts == {
        "proj_xa": 4_722_688,
        "norm_xa": 4_096,
        "attention": 67_108_864,
        "gates": 134_217_728,
        "norm_cross": 131_072,
        "total": 206_184_448,
    }
    assert model.num_parameters() == count_parameters(LMConfig.moshi_7b()) + 206_184_448


@pytest.mark.parametrize(
    ("sharing", "gating", "gate_shared"),
    [
        ("qkv", "conditional_sigmoid", False),
        ("kv", "conditional_sigmoid", False),
        ("none", "conditional_sigmoid", False),
        ("qkv", "conditional_sigmoid", True),
        ("kv", "tanh_scalar", True),
        ("none", "tanh_scalar", False),
        ("qkv", "none", False),
    ],
)
def test_counts_per_sharing_and_gating(sharing: str, gating: str, gate_shared: bool) -> None:
    model = build(sharing=sharing, gating=gating, gate_shared=gate_shared)
    d, n_layers = LM.dim, LM.num_layers
    attention = {"qkv": 4 * d * d, "kv": 2 * d * d + n_layers * 2 * d * d}
    one_gate = {"conditional_sigmoid": 2 * d * (d // 8), "tanh_scalar": 1, "none": 0}[gating]
    gates = one_gate if gate_shared else n_layers * one_gate
    gates += n_layers if (gate_shared and sharing == "qkv") else 0  # per_layer_alpha
    counts = count_adapter_parameters(model)
    assert counts["attention"] == attention.get(sharing, n_layers * 4 * d * d)
    assert counts["gates"] == gates
    assert counts["norm_cross"] == n_layers * d and counts["norm_xa"] == d
    assert counts["proj_xa"] == IMAGE_DIM * d + d
    assert model.num_parameters() == count_parameters(LM) + counts["total"]
    sd = model.state_dict()
    if sharing == "qkv":
        assert sd["shared_xa.in_proj_weight"].shape == (3 * d, d)
        assert not any(".cross_attention.mha." in k for k in sd)
    elif sharing == "kv":
        assert sd["shared_xa.in_proj_weight_kv"].shape == (2 * d, d)
        assert sd["lm.transformer.layers.2.cross_attention.mha.in_proj_weight_q"].shape == (d, d)
    else:
        assert sd["lm.transformer.layers.1.cross_attention.mha.in_proj_weight"].shape == (3 * d, d)
    if gating == "conditional_sigmoid" and not gate_shared:
        assert sd["lm.transformer.layers.0.cross_attention.gate.alpha.0.weight"].shape == (
            d // 8,
            d,
        )
        assert sd["lm.transformer.layers.0.cross_attention.gate.alpha.2.weight"].shape == (
            d,
            d // 8,
        )


# ---------------------------------------------------------------- gate = 0 is the base model


def test_gate_zero_equals_base_bit_for_bit(base: MoshiLM, model: MoshiVis) -> None:
    codes, img = random_codes(2, 12), image(2)
    ref = base(codes)
    with model.gate_override(0.0):
        out = model(codes, img)
    assert same(out.text_logits, ref.text_logits) and same(out.logits, ref.logits)
    assert torch.equal(out.mask, ref.mask) and (out.gates == 0).all()
    assert not same(model(codes, img).text_logits, ref.text_logits)  # the image does matter
    assert same(model(codes).text_logits, ref.text_logits)  # no image: the base model

    g = torch.Generator().manual_seed(3)
    user = torch.randint(0, LM.card, (2, base.n_user, 20), generator=g)  # 20 > context 16
    ref_outs, ref_text, ref_audio, _ = stream(base, user)
    with torch.no_grad():
        kv = model.encode_image(img)
    with model.gate_override(0.0):
        outs, text, audio, gates = stream(model, user, kv)
    for j in range(20):
        assert torch.equal(outs[j][0], ref_outs[j][0]) and torch.equal(outs[j][1], ref_outs[j][1])
        assert torch.equal(text[j], ref_text[j]) and torch.equal(audio[j], ref_audio[j])
        assert gates[j].shape == (2, LM.num_layers) and (gates[j] == 0).all()
    _, text, _, _ = stream(model, user, kv)
    assert not torch.equal(text[5], ref_text[5])


@pytest.mark.parametrize("sharing", ["qkv", "kv", "none"])
def test_zero_out_proj_starts_at_the_base_model_and_still_learns(base: MoshiLM, sharing) -> None:
    with pytest.raises(ValueError, match="out_proj_init"):
        XAConfig(out_proj_init="small")
    codes, img = random_codes(2, 9), image(2)
    ref = base(codes)
    model = build(lm=copy.deepcopy(base), sharing=sharing, gate_bias=0.0, out_proj_init="zero")
    assert all((a.attention.out_proj.weight == 0).all() for a in model.adapters)
    assert "out_proj zero-init" in repr(model.adapters[0].attention)
    out, cache = model.run_with_cache(codes, img, names_filter="*.hook_gate")
    # y = 0: the update g * y is exactly 0, the base model bit for bit, and the gate is sigmoid(0)
    assert same(out.text_logits, ref.text_logits) and same(out.logits, ref.logits)
    assert all(torch.allclose(g, torch.full_like(g, 0.5)) for g in cache.values())
    # only out_proj gets a gradient at the first step; after one update the image matters
    freeze_for_adapters(model)
    model.train()
    loss = model(codes, img).text_logits.float().logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("out_proj" in n and g is not None and g.abs().sum() > 0 for n, g in grads.items())
    with torch.no_grad():
        for a in model.adapters:
            a.attention.out_proj.weight.add_(0.01)
    assert not same(model.eval()(codes, img).text_logits, ref.text_logits)
    # Kyutai's init stays the paper's: bias -4, truncated-normal out_proj
    kyutai = XAConfig.moshika_vis()
    assert (kyutai.gate_bias, kyutai.out_proj_init) == (-4.0, "default")


def test_tanh_scalar_starts_closed_and_none_is_open(base: MoshiLM) -> None:
    codes, img = random_codes(1, 8), image(1)
    ref = base(codes)
    tanh = build(lm=copy.deepcopy(base), gating="tanh_scalar")
    out = tanh(codes, img)
    assert same(out.text_logits, ref.text_logits) and (out.gates == 0).all()
    assert all(a.gate_module.alpha.item() == 0.0 for a in tanh.adapters)
    ungated = build(lm=copy.deepcopy(base), gating="none")
    out, cache = ungated.run_with_cache(codes, img, names_filter="*.hook_gate")
    assert all((g == 1).all() and g.shape == (1, 8, LM.dim) for g in cache.values())
    assert (out.gates == 1).all() and not same(out.text_logits, ref.text_logits)


def test_conditional_gates_at_init(model: MoshiVis) -> None:
    out, cache = model.run_with_cache(random_codes(2, 9), image(2), names_filter="*.hook_gate")
    assert out.gates.shape == (2, LM.num_layers, 9) and out.xa_layers == (0, 1, 2)
    for n, i in enumerate(out.xa_layers):
        g = cache[f"temporal.layers.{i}.cross_attention.hook_gate"]
        assert g.shape == (2, 9, LM.dim)
        assert ((g > 0) & (g < 1)).all()
        assert torch.allclose(out.gates[:, n], g.mean(-1))
    init = torch.sigmoid(torch.tensor(-4.0))
    assert (out.gates.mean() - init).abs() < 0.01 and (out.gates - init).abs().max() < 0.05
    assert out.gate_score(last=2).shape == (2, 9)
    assert torch.allclose(out.gate_score(last=2), out.gates[:, 1:].mean(1))


# ---------------------------------------------------------------- K/V once, sharing modes


@pytest.mark.parametrize(("sharing", "groups"), [("qkv", 1), ("kv", 1), ("none", LM.num_layers)])
def test_image_kv_is_computed_once(base: MoshiLM, sharing: str, groups: int) -> None:
    model = build(lm=copy.deepcopy(base), sharing=sharing)
    calls: list[str] = []
    count = (
        lambda n: n.endswith("hook_k") and "self_attn" not in n,
        lambda t, hook: calls.append(hook.name),
    )
    with model.hooks([count]):
        out = model(random_codes(2, 10), image(2))
    assert len(calls) == groups  # once per K/V group, not per layer or per step
    assert len(set(calls)) == groups
    kv = model.encode_image(image(1)).detach()
    assert kv.num_groups == groups and kv.keys[0].shape == (1, 4, N_IMAGE, LM.dim // 4)
    calls.clear()
    user = torch.zeros(2, base.n_user, 6, dtype=torch.long)
    with model.hooks([count]):
        stream(model, user, kv)  # a batch-1 image broadcast over a batch of 2
    assert calls == []  # streaming reuses the image K/V
    # The batch-1 image equals the image repeated.
    codes, img = random_codes(2, 6), image(1)
    assert torch.allclose(
        model(codes, img).text_logits, model(codes, img.expand(2, -1, -1)).text_logits
    )
    assert out.gates.shape == (2, LM.num_layers, 10)


def test_shared_weights_are_one_module(model: MoshiVis) -> None:
    assert all(a.attention is model.shared_xa for a in model.adapters)
    assert not any("mha" in n for n, _ in model.lm.named_parameters())
    clone = copy.deepcopy(model)
    assert all(a.attention is clone.shared_xa for a in clone.adapters)
    assert clone.shared_xa is not model.shared_xa
    kv = build(sharing="kv")
    assert all(a.attention is not kv.shared_xa for a in kv.adapters)


# ---------------------------------------------------------------- attention paths, hooks


def test_eager_path_equals_fused_and_patterns(model: MoshiVis) -> None:
    codes, img = random_codes(2, 11), image(2)
    fast = model(codes, img)
    eager = model(codes, img, eager=True)
    assert (eager.text_logits - fast.text_logits).abs().max() < 1e-5
    assert (eager.logits - fast.logits)[fast.mask].abs().max() < 1e-5
    out, cache = model.run_with_cache(codes, img, names_filter="*cross_attention.hook_pattern")
    assert (out.text_logits - fast.text_logits).abs().max() < 1e-5
    p = cache["temporal.layers.2.cross_attention.hook_pattern"]
    assert p.shape == (2, 4, 11, N_IMAGE)
    assert torch.allclose(p.sum(-1), torch.ones(2, 4, 11)) and (p > 0).all()  # no image mask


def test_hook_names(model: MoshiVis) -> None:
    names = model.hook_names()
    assert len(names) == len(set(names))
    assert names[:3] == ["image_prefix.hook_out", "shared_xa.hook_k", "shared_xa.hook_v"]
    for i in range(LM.num_layers):
        for h in ("hook_q", "hook_pattern", "hook_attn", "hook_gate", "hook_out"):
            assert f"temporal.layers.{i}.cross_attention.{h}" in names
    assert set(model.lm.hook_names()) <= set(names)  # every LM hook keeps its name
    order = [
        names.index(f"temporal.layers.1.{h}")
        for h in ("hook_resid_mid", "cross_attention.hook_gate", "hook_mlp_hidden")
    ]
    assert order == sorted(order)  # listed in forward order
    assert len(names) == 11 * (LM.num_layers + LM.depformer_num_layers) + 5 + 3 + 5 * 3
    assert not any(n.startswith("depformer") and "cross" in n for n in names)
    _, cache = run_with_cache(
        model,
        random_codes(1, 4),
        image(1),
        names_filter=["image_prefix.hook_out", "*.cross_attention.hook_out"],
    )
    assert cache["image_prefix.hook_out"].shape == (1, N_IMAGE, LM.dim)
    assert cache["temporal.layers.0.cross_attention.hook_out"].shape == (1, 4, LM.dim)
    partial = build(xa_layers=(1,))
    assert [n for n in partial.hook_names() if n.endswith("cross_attention.hook_gate")] == [
        "temporal.layers.1.cross_attention.hook_gate"
    ]
    assert partial.lm.transformer.layers[0].cross_attention is None
    assert partial(random_codes(1, 4), image(1)).gates.shape == (1, 1, 4)


# ---------------------------------------------------------------- xa_start, overrides


def test_xa_start_skips_first_steps(base: MoshiLM) -> None:
    model = build(lm=copy.deepcopy(base), xa_start=3)
    g = torch.Generator().manual_seed(4)
    user = torch.randint(0, LM.card, (1, base.n_user, 8), generator=g)
    with torch.no_grad():
        kv = model.encode_image(image(1))
    outs, text, _, gates = stream(model, user, kv)
    _, ref_text, _, _ = stream(base, user)
    for j in range(3):
        assert torch.equal(text[j], ref_text[j]) and (gates[j] == 0).all()
    assert all((gates[j] > 0).all() for j in range(3, 8))
    assert not torch.equal(text[4], ref_text[4])
    # Teacher-forced forward with the same xa_start reproduces the stream.
    md, t_grid = LM.max_delay, 8 - LM.max_delay
    codes = torch.empty(1, LM.num_codebooks, t_grid, dtype=torch.long)
    for t in range(t_grid):
        codes[:, 0, t], codes[:, 1 : 1 + LM.dep_q, t] = outs[t + md]
    codes[:, 1 + LM.dep_q :] = user[:, :, 1 : t_grid + 1]
    _, cache = model.run_with_cache(codes, image_kv=kv, xa_start=3, names_filter="hook_text_logits")
    ref = torch.stack(text[:t_grid], dim=1)
    assert (cache["hook_text_logits"] - ref).abs().max() < 1e-4
    forward = model(codes, image_kv=kv, xa_start=3)
    assert (forward.gates[..., :3] == 0).all() and (forward.gates[..., 3:] > 0).all()
    assert torch.allclose(forward.gates[0, :, 3:], torch.stack(gates[3:t_grid], 2)[0], atol=1e-5)


def test_gate_override(model: MoshiVis) -> None:
    codes, img = random_codes(1, 6), image(1)
    base = model(codes, img)
    with model.gate_override(1.0):
        out, cache = model.run_with_cache(codes, img, names_filter="*.hook_gate")
    assert (out.gates == 1).all() and all((g == 1).all() for g in cache.values())
    with model.gate_override(scale=0.5, layers=[1]):
        half = model(codes, img)
    assert torch.allclose(half.gates[:, 1], 0.5 * base.gates[:, 1])
    assert torch.equal(half.gates[:, 0], base.gates[:, 0])  # layers before 1 are untouched
    with pytest.raises(KeyError), model.gate_override(0.0, layers=2):
        raise KeyError("boom")
    assert all(a.gate_override is None for a in model.adapters)
    assert torch.equal(model(codes, img).text_logits, base.text_logits)
    with pytest.raises(ValueError, match="exactly one"):
        model.gate_override().__enter__()
    with pytest.raises(ValueError, match="exactly one"):
        model.gate_override(0.0, scale=2.0).__enter__()
    with pytest.raises(ValueError, match="no cross-attention"):
        model.gate_override(0.0, layers=[7]).__enter__()


def test_input_errors(model: MoshiVis) -> None:
    codes = random_codes(2, 4)
    with pytest.raises(ValueError, match="image_dim=24"):
        model(codes, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="float tensor"):
        model.encode_image(torch.zeros(2, 3, IMAGE_DIM, dtype=torch.long))
    kv = model.encode_image(image(2))
    with pytest.raises(ValueError, match="not both"):
        model(codes, image(2), image_kv=kv)
    with pytest.raises(ValueError, match="3 images for a batch of 2"):
        model(codes, image(3))
    other = build(sharing="none").encode_image(image(2))
    with pytest.raises(ValueError, match="3 K/V group"):
        model(codes, image_kv=other)
    with pytest.raises(ValueError, match="ImageKV"):
        model.lm(codes, image_kv=torch.zeros(2, 3, LM.dim))
    with pytest.raises(ValueError, match="already hold"):
        MoshiVis(vis_cfg(), model.lm)
    with pytest.raises(RuntimeError, match="streaming session"):
        model.step(torch.zeros(1, model.n_user, dtype=torch.long), kv)
    with pytest.raises(ValueError, match="same shape|one shape"):
        ImageKV((kv.keys[0],), (kv.values[0][:, :, :2],))


# ---------------------------------------------------------------- training helpers


def test_freeze_for_adapters(capsys) -> None:
    model = build(sharing="kv")
    model.train()
    counts = freeze_for_adapters(model, verbose=True)
    expected = count_adapter_parameters(model)
    assert {k: counts[k] for k in expected} == expected
    assert counts["frozen"] == count_parameters(LM)  # the whole base LM, nothing else
    assert "total" in capsys.readouterr().out
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(model)}
    codes = random_codes(1, 6)
    out = model(codes, image(1))
    model.loss(codes, out)["loss"].backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in adapter_parameters(model))


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(model: MoshiVis, tmp_path) -> None:
    path = save_moshivis(model, tmp_path / "vis" / "model.safetensors")
    keys = set(load_file(path))
    d = LM.dim
    assert "llm.transformer.layers.0.cross_attention.mha.in_proj_weight" in keys
    assert "llm.transformer.layers.0.cross_attention.mha.out_proj.weight" in keys
    assert not any(k.startswith("llm.transformer.layers.1.cross_attention.mha") for k in keys)
    for i in range(LM.num_layers):
        assert f"llm.transformer.layers.{i}.cross_attention.gate.alpha.0.weight" in keys
        assert f"llm.transformer.layers.{i}.cross_attention.gate.alpha.2.weight" in keys
        assert f"llm.transformer.layers.{i}.norm_cross.alpha" in keys
        assert f"llm.transformer.layers.{i}.self_attn.in_proj_weight" in keys
    for k in (
        "image_prefix.proj_xa.weight",
        "image_prefix.proj_xa.bias",
        "image_prefix.norm_xa.alpha",
    ):
        assert k in keys
    for k in (
        "llm.text_emb.weight",
        "llm.out_norm.alpha",
        "audio_emb.0.weight",
        "audio_linears.7.weight",
        "depformer_text_emb.weight",
        "depformer.layers.0.self_attn.in_proj_weight",
    ):
        assert k in keys
    assert not any(k.startswith(("lm.", "shared_xa", "emb.", "linears.")) for k in keys)
    assert load_file(path)["llm.transformer.layers.2.norm_cross.alpha"].shape == (1, 1, d)

    back = load_moshivis(path)
    assert back.cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    codes, img = random_codes(1, 5), image(1)
    assert torch.equal(back(codes, img).text_logits, model(codes, img).text_logits)
    fresh = build(seed=9)
    assert load_moshivis_weights(fresh, path) == []
    assert torch.equal(fresh(codes, img).text_logits, model(codes, img).text_logits)
    assert read_moshivis_config(path) == model.cfg
    assert (
        load_moshivis(path, dtype=torch.bfloat16).shared_xa.in_proj_weight.dtype == torch.bfloat16
    )


@pytest.mark.parametrize(
    "xa",
    [
        dict(sharing="kv"),
        dict(sharing="none", gating="tanh_scalar"),
        dict(gate_shared=True, xa_layers=(1, 2)),
    ],
)
def test_checkpoint_round_trip_other_settings(xa: dict, tmp_path) -> None:
    model = build(seed=2, **xa)
    with torch.no_grad():  # move the scalars off their init values
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = save_moshivis(model, tmp_path / "model.safetensors")
    keys = set(load_file(path))
    first = model.cfg.layers[0]
    if xa.get("sharing") == "kv":
        assert f"llm.transformer.layers.{first}.cross_attention.mha.in_proj_weight_kv" in keys
        assert "llm.transformer.layers.2.cross_attention.mha.in_proj_weight_q" in keys
    if xa.get("gate_shared"):
        assert f"llm.transformer.layers.{first}.cross_attention.gate.alpha.0.weight" in keys
        assert "llm.transformer.layers.2.cross_attention.per_layer_alpha" in keys
        assert "llm.transformer.layers.2.cross_attention.gate.alpha.0.weight" not in keys
    back = load_moshivis(path)
    assert back.cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    codes, img = random_codes(1, 5), image(1)
    assert torch.equal(back(codes, img).text_logits, model(codes, img).text_logits)


def test_bad_checkpoints_are_refused_whole(model: MoshiVis, tmp_path) -> None:
    good = save_moshivis(model, tmp_path / "good.safetensors")
    state = load_file(good)
    del state["llm.transformer.layers.1.cross_attention.gate.alpha.2.weight"]
    state["llm.transformer.layers.1.cross_attention.mha.bias_q"] = torch.zeros(LM.dim)
    state["image_prefix.proj_xa.weight"] = torch.zeros(LM.dim, IMAGE_DIM + 1)
    save_file(state, tmp_path / "bad.safetensors")
    target = build(seed=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_moshivis_weights(target, tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "1 missing: llm.transformer.layers.1.cross_attention.gate.alpha.2.weight" in msg
    assert "1 unexpected: llm.transformer.layers.1.cross_attention.mha.bias_q" in msg
    assert "1 mis-shaped: image_prefix.proj_xa.weight [64, 25] (expected [64, 24])" in msg
    assert "Nothing was loaded" in msg
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with pytest.raises(ValueError, match="mis-shaped"):
        load_moshivis(tmp_path / "bad.safetensors", model.cfg)
    # A copy of the shared projections under another layer (kyuteye's modules sit in every
    # layer) is read when it equals the stored one and refused when it does not.
    state = load_file(good)
    copy = "llm.transformer.layers.1.cross_attention.mha.in_proj_weight"
    state[copy] = state["llm.transformer.layers.0.cross_attention.mha.in_proj_weight"].clone()
    save_file(state, tmp_path / "copies.safetensors")
    load_moshivis_weights(target, tmp_path / "copies.safetensors")
    assert torch.equal(target.shared_xa.in_proj_weight, model.shared_xa.in_proj_weight)
    target.load_state_dict(before)
    state[copy] = torch.zeros_like(state[copy])
    save_file(state, tmp_path / "not_shared.safetensors")
    with pytest.raises(ValueError, match=r"differ from the first layer's shared.*sharing='none'"):
        load_moshivis_weights(target, tmp_path / "not_shared.safetensors")

    pickled = tmp_path / "model.pt"
    torch.save(model.state_dict(), pickled)
    with pytest.raises(ValueError, match="pickle.*safetensors"):
        load_moshivis(pickled, model.cfg)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pickled.read_bytes())
    with pytest.raises(ValueError, match="pickle"):
        load_moshivis_weights(target, disguised)
    with pytest.raises(ValueError, match=".safetensors"):
        save_moshivis(model, tmp_path / "model.bin")
    state = load_file(good)
    state["llm.out_norm.alpha"] = state["llm.out_norm.alpha"].long()
    save_file(state, tmp_path / "int.safetensors")
    with pytest.raises(ValueError, match="non-float"):
        load_moshivis_weights(target, tmp_path / "int.safetensors")


def _hand_written_release(model: MoshiVis) -> dict[str, torch.Tensor]:
    """A checkpoint in the reference PyTorch layout, written without the library's name map."""
    out: dict[str, torch.Tensor] = {}
    backbone = {k: v for k, v in model.lm.state_dict().items() if ".cross_attention." not in k}
    for k, v in to_released(backbone).items():
        if k.startswith(("text_emb.", "transformer.", "out_norm.", "text_linear.")):
            k = "llm." + k
        elif k.startswith("emb."):
            k = "audio_emb." + k[4:]
        elif k.startswith("linears."):
            k = "audio_linears." + k[8:]
        out[k] = v.clone()
    for a in model.adapters:
        i = a.layer_index
        out[f"llm.transformer.layers.{i}.norm_cross.alpha"] = a.norm_cross.alpha.detach().clone()
        for j in (0, 2):
            w = a.gate_module.alpha[j].weight
            out[f"llm.transformer.layers.{i}.cross_attention.gate.alpha.{j}.weight"] = (
                w.detach().clone()
            )
    out["llm.transformer.layers.0.cross_attention.mha.in_proj_weight"] = (
        model.shared_xa.in_proj_weight.detach().clone()
    )
    out["llm.transformer.layers.0.cross_attention.mha.out_proj.weight"] = (
        model.shared_xa.out_proj.weight.detach().clone()
    )
    prefix = model.image_prefix
    out["image_prefix.proj_xa.weight"] = prefix.proj_xa.weight.detach().clone()
    out["image_prefix.proj_xa.bias"] = prefix.proj_xa.bias.detach().clone()
    out["image_prefix.norm_xa.alpha"] = prefix.norm_xa.alpha.detach().clone()
    # The SigLIP tower rides along in the released file; this loader skips it.
    out["image_prefix.enc.model.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(
        8, 3, 2, 2
    )
    out["image_prefix.enc.model.vision_model.post_layernorm.bias"] = torch.zeros(8)
    return out


def test_released_layout_loader(model: MoshiVis, tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_hand_written_release(model), path)  # no metadata, like the real file
    assert read_moshivis_config(path) is None
    assert encoder_keys(path) == [
        "image_prefix.enc.model.vision_model.embeddings.patch_embedding.weight",
        "image_prefix.enc.model.vision_model.post_layernorm.bias",
    ]
    back = load_moshivis(path, model.cfg)
    codes, img = random_codes(2, 7), image(2)
    assert torch.equal(back(codes, img).text_logits, model(codes, img).text_logits)
    assert torch.equal(back(codes, img).logits.nan_to_num(), model(codes, img).logits.nan_to_num())
    fresh = build(seed=3)
    assert load_moshivis_weights(fresh, path) == encoder_keys(path)
    assert same(fresh(codes, img).text_logits, model(codes, img).text_logits)


def test_adapters_only_round_trip(base: MoshiLM, model: MoshiVis, tmp_path) -> None:
    path = save_adapters(model, tmp_path / "adapters.safetensors")
    keys = set(load_file(path))
    assert not any(k.endswith(("self_attn.in_proj_weight", "text_emb.weight")) for k in keys)
    assert "llm.transformer.layers.0.cross_attention.mha.in_proj_weight" in keys
    assert sum(load_file(path)[k].numel() for k in keys) == count_adapter_parameters(model)["total"]
    # Base LM from its own checkpoint + adapters from theirs = the trained model.
    base_path = save_moshi(base, tmp_path / "base.safetensors")
    from moshivis_lab.model import load_moshi

    rebuilt = build(seed=11, lm=load_moshi(base_path))
    load_adapters(rebuilt, path)
    codes, img = random_codes(1, 6), image(1)
    assert torch.equal(rebuilt(codes, img).text_logits, model(codes, img).text_logits)
    other = build(seed=2, gating="tanh_scalar")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(
        ValueError, match="gating: file 'conditional_sigmoid' vs model 'tanh_scalar'"
    ):
        load_adapters(other, path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    full = save_moshivis(model, tmp_path / "full.safetensors")
    with pytest.raises(ValueError, match="unexpected"):
        load_adapters(build(seed=4), full)


def test_pooled_image_tokens_and_their_attention(base: MoshiLM) -> None:
    from moshivis_lab.interp.attention import cross_attention_maps, fold_pooled_attention
    from moshivis_lab.model.adapters import pool_token_grid

    with pytest.raises(ValueError, match="XAConfig.pool_tokens"):
        vis_cfg(pool_tokens=1)
    # 5 x 5 tokens in 2 x 2 blocks: 9 block means (edge blocks of 2 or 1 tokens) appended
    x = torch.arange(2 * 25 * 3, dtype=torch.float32).reshape(2, 25, 3)
    y = pool_token_grid(x, 2)
    assert y.shape == (2, 25 + 9, 3) and torch.equal(y[:, :25], x)
    grid = x.reshape(2, 5, 5, 3)
    assert torch.allclose(y[:, 25], grid[:, :2, :2].mean(dim=(1, 2)))
    assert torch.allclose(y[:, 27], grid[:, :2, 4].mean(dim=1))  # right edge: 2 tokens
    assert torch.allclose(y[:, 33], grid[:, 4, 4])  # the corner block holds one token
    with pytest.raises(ValueError, match="square grid"):
        pool_token_grid(x[:, :24], 2)
    # folding shares each block key's weight over its tokens; rows keep their sums
    w = torch.softmax(torch.randn(4, 34), dim=-1)
    f = fold_pooled_attention(w, 25, 2)
    assert f.shape == (4, 25) and torch.allclose(f.sum(-1), torch.ones(4))
    assert torch.allclose(f[:, 24], w[:, 24] + w[:, 33])
    assert torch.allclose(f[:, 0], w[:, 0] + w[:, 25] / 4)
    assert np.allclose(fold_pooled_attention(w.numpy(), 25, 2), f.numpy(), atol=1e-6)
    v = w[:, :25]
    assert fold_pooled_attention(v, 25, 0) is v  # no block keys: unchanged
    with pytest.raises(ValueError, match="blocks"):
        fold_pooled_attention(w[:, :30], 25, 2)
    # a model with pooled tokens: its cross-attention maps are over the 5 x 5 grid and sum to 1
    torch.manual_seed(0)
    m = MoshiVis(vis_cfg(pool_tokens=2, gating="none"), base).eval()
    img = torch.randn(1, 25, IMAGE_DIM)
    maps = cross_attention_maps(m, random_codes(1, 6)[0], img)
    assert maps.side == 5 and np.allclose(maps.weights.sum(-1), 1.0, atol=1e-5)
