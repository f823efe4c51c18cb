"""MoshiLM: shapes, delays, zero token, loss weights, streaming, hooks, checkpoints, converse."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moshivis_lab.config import TEXT_EPAD_ID, TEXT_PAD_ID, LMConfig
from moshivis_lab.model import (
    MoshiLM,
    converse,
    count_parameters,
    delay_codes,
    load_moshi,
    load_weights,
    run_with_cache,
    save_moshi,
    timed_transcript,
    undelay,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# A small model keeps the file fast; the moshi equivalence tests use the tiny preset itself.
CFG = dataclasses.replace(
    LMConfig.tiny(),
    dim=64,
    num_layers=2,
    num_heads=4,
    text_card=300,
    card=64,
    context=16,
    depformer_dim=32,
    depformer_num_layers=2,
    depformer_num_heads=2,
)


@pytest.fixture(scope="module")
def model() -> MoshiLM:
    torch.manual_seed(0)
    return MoshiLM(CFG).eval()


def random_codes(b: int = 2, t: int = 12, seed: int = 0, cfg: LMConfig = CFG) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.card, (b, cfg.num_codebooks, t), generator=g)
    codes[:, 0] = torch.randint(0, cfg.text_card, (b, t), generator=g)
    return codes


# ---------------------------------------------------------------- shapes, delays, zero token


def test_forward_shapes_and_masks(model: MoshiLM) -> None:
    codes = random_codes(2, 10)
    out = model(codes)
    assert out.text_logits.shape == (2, 1, 10, CFG.text_card)
    assert out.logits.shape == (2, CFG.dep_q, 10, CFG.card)
    assert out.text_mask.shape == (2, 1, 10) and out.mask.shape == (2, CFG.dep_q, 10)
    assert out.text_mask.all()  # text has no delay
    assert out.mask[:, 0].all() and not out.mask[:, 1:, -1].any()  # delayed rows lose the end
    assert out.mask[:, 1:, :-1].all()
    assert torch.isnan(out.logits[:, 1:, -1]).all() and torch.isfinite(out.logits[out.mask]).all()
    assert count_parameters(CFG) == model.num_parameters()


@settings(max_examples=40, deadline=None)
@given(
    delays=st.lists(st.integers(0, 3), min_size=1, max_size=5),
    t=st.integers(1, 9),
    seed=st.integers(0, 1000),
)
def test_delay_then_undelay_is_identity(delays: list[int], t: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 50, (2, len(delays), t), generator=g)
    initial = torch.full((len(delays),), 99)
    delayed = delay_codes(codes, delays, initial)
    for k, d in enumerate(delays):
        assert (delayed[:, k, : min(d, t)] == 99).all()
    back, mask = undelay(delayed, delays, -7)
    assert torch.equal(back[mask], codes[mask])
    assert (back[~mask] == -7).all()
    assert torch.equal(mask[0].sum(-1), torch.tensor([max(t - d, 0) for d in delays]))


def test_zero_token_embeds_to_exactly_zero_and_is_masked(model: MoshiLM) -> None:
    codes = torch.full((1, CFG.num_codebooks, 6), -1)
    _, cache = run_with_cache(model, codes, names_filter="hook_embed")
    emb = cache["hook_embed"]
    # Step s reads grid column s - 1; from step max_delay + 1 on, every row holds the zero token.
    assert (emb[:, CFG.max_delay + 1 :] == 0).all()
    assert emb[:, 0].abs().sum() > 0  # the initial tokens are real embeddings

    codes = random_codes(1, 8)
    codes[0, 0, 2] = -1
    codes[0, 1, 3] = -1
    codes[0, 5, :] = -1
    out = model(codes)
    assert not out.text_mask[0, 0, 2] and not out.mask[0, 0, 3] and not out.mask[0, 4].any()
    logits = out.logits.detach().requires_grad_(True)
    text_logits = out.text_logits.detach().requires_grad_(True)
    parts = model.loss(codes, dataclasses.replace(out, logits=logits, text_logits=text_logits))
    parts["loss"].backward()
    assert torch.isfinite(parts["loss"])
    assert (logits.grad[~out.mask] == 0).all() and (text_logits.grad[~out.text_mask] == 0).all()


def test_all_zero_tokens_give_zero_loss_parts(model: MoshiLM) -> None:
    codes = random_codes(1, 6)
    codes[:, 1:] = -1  # a speechless sample: text only
    out = model(codes)
    parts = model.loss(codes, out)
    assert parts["audio_loss"] == 0 and parts["text_loss"] > 0


def test_bad_inputs_raise_value_errors(model: MoshiLM) -> None:
    codes = random_codes(1, 4)
    with pytest.raises(ValueError, match="shape"):
        model(codes[:, :5])
    with pytest.raises(ValueError, match="integer"):
        model(codes.float())
    bad = codes.clone()
    bad[0, 0, 0] = CFG.text_card
    with pytest.raises(ValueError, match="text row"):
        model(bad)
    bad = codes.clone()
    bad[0, 3, 1] = -2
    with pytest.raises(ValueError, match="audio rows"):
        model(bad)
    with pytest.raises(ValueError, match="cross_attention"):
        model(codes, image_kv=torch.zeros(1, 4, CFG.dim))


# ---------------------------------------------------------------- loss


def test_loss_weights(model: MoshiLM) -> None:
    codes = random_codes(2, 10, seed=3)
    codes[:, 0, ::3] = TEXT_PAD_ID
    codes[:, 0, 1::5] = TEXT_EPAD_ID
    out = model(codes)
    parts = model.loss(codes, out)
    n = out.mask.sum(dim=(0, 2)).float()  # valid positions per codebook
    per = parts["audio_loss_per_codebook"]
    for w in (1.0, 100.0):
        other = MoshiLM(dataclasses.replace(CFG, semantic_weight=w))
        other.load_state_dict(model.state_dict())
        got = other.loss(codes, out)["audio_loss"]
        expected = (w * per[0] * n[0] + (per[1:] * n[1:]).sum()) / (w * n[0] + n[1:].sum())
        assert torch.allclose(got, expected, rtol=1e-5)
    # Text: PAD/EPAD targets weigh text_padding_weight.
    ce = torch.nn.functional.cross_entropy(
        out.text_logits[:, 0].flatten(0, 1), codes[:, 0].flatten(), reduction="none"
    )
    pad = (codes[:, 0].flatten() == TEXT_PAD_ID) | (codes[:, 0].flatten() == TEXT_EPAD_ID)
    for w in (0.5, 0.0):
        other = MoshiLM(dataclasses.replace(CFG, text_padding_weight=w))
        weights = torch.where(pad, w, 1.0)
        got = other.loss(codes, out)["text_loss"]
        assert torch.allclose(got, (ce * weights).sum() / weights.sum(), rtol=1e-5)
    combined = MoshiLM(dataclasses.replace(CFG, text_weight=2.0, audio_weight=0.5))
    p = combined.loss(codes, out)
    assert torch.allclose(p["loss"], 2.0 * p["text_loss"] + 0.5 * p["audio_loss"])


# ---------------------------------------------------------------- streaming


def stream(model: MoshiLM, user: torch.Tensor, **kw) -> tuple[list, list, list]:
    """Run the model over user frames [B, n_user, N]; collect outputs and logits per call."""
    outs, text_logits, audio_logits = [], [], []
    with model.streaming(user.shape[0], **kw) as st_:
        for j in range(user.shape[2]):
            outs.append(model.step(user[:, :, j]))
            text_logits.append(st_.text_logits)
            audio_logits.append(st_.audio_logits)
    return outs, text_logits, audio_logits


def test_streaming_equals_teacher_forced_forward(model: MoshiLM) -> None:
    b, n, md = 2, 24, CFG.max_delay  # 24 steps > context 16: the KV ring wraps
    g = torch.Generator().manual_seed(5)
    user = torch.randint(0, CFG.card, (b, model.n_user, n), generator=g)
    outs, text_logits, audio_logits = stream(
        model, user, temperature=1.0, text_temperature=1.0, seed=0
    )
    assert all((t == -1).all() and (a == -1).all() for t, a in outs[:md])
    t_grid = n - md
    codes = torch.empty(b, CFG.num_codebooks, t_grid, dtype=torch.long)
    for t in range(t_grid):
        text, audio = outs[t + md]
        codes[:, 0, t], codes[:, 1 : 1 + CFG.dep_q, t] = text, audio
    codes[:, 1 + CFG.dep_q :] = user[:, :, 1 : t_grid + 1]  # user frame j is grid column j - 1
    _, cache = run_with_cache(model, codes, names_filter=["hook_text_logits", "hook_audio_logits"])
    # Step s of the forward is call s of the stream (model time, before re-alignment).
    text_ref = torch.stack(text_logits[:t_grid], dim=1)
    assert (cache["hook_text_logits"] - text_ref).abs().max() < 1e-4
    audio_ref = torch.stack(audio_logits[md:t_grid], dim=1)  # before md, the depformer saw
    assert (cache["hook_audio_logits"][:, md:] - audio_ref).abs().max() < 1e-4  # sampled init


def test_seeded_sampling_is_reproducible(model: MoshiLM) -> None:
    user = torch.randint(
        0, CFG.card, (1, model.n_user, 8), generator=torch.Generator().manual_seed(1)
    )
    a, _, _ = stream(model, user, seed=7)
    b, _, _ = stream(model, user, seed=7)
    c, _, _ = stream(model, user, seed=8, temperature=5.0, text_temperature=5.0, top_k=0)
    flat = lambda outs: torch.cat([torch.cat([t[:, None], x], 1) for t, x in outs])  # noqa: E731
    assert torch.equal(flat(a), flat(b)) and not torch.equal(flat(a), flat(c))
    greedy, _, _ = stream(model, user, temperature=0.0, text_temperature=0.0)
    greedy2, _, _ = stream(model, user, temperature=0.0, text_temperature=0.0, seed=123)
    assert torch.equal(flat(greedy), flat(greedy2))


def test_streaming_context_manager_cleans_up(model: MoshiLM) -> None:
    user = torch.zeros(1, model.n_user, dtype=torch.long)
    with pytest.raises(RuntimeError, match="streaming"):
        model.step(user)
    with model.streaming(1):
        assert model.is_streaming
        with pytest.raises(RuntimeError, match="already streaming"), model.streaming(1):
            pass
        with pytest.raises(ValueError, match="shape"):
            model.step(torch.zeros(2, model.n_user, dtype=torch.long))
        with pytest.raises(ValueError, match="integer"):
            model.step(user.float())
        with pytest.raises(ValueError, match=r"\[-1, 64\)"):
            model.step(user + CFG.card)
        model.step(user)
    assert not model.is_streaming and model.streaming_state is None
    with pytest.raises(KeyError), model.streaming(1):
        raise KeyError("boom")
    assert not model.is_streaming
    with model.streaming(1):  # usable again, starting from scratch
        assert model.streaming_state.offset == 0


# ---------------------------------------------------------------- hooks


def test_hook_names(model: MoshiLM) -> None:
    names = model.hook_names()
    for i in range(CFG.num_layers):
        for n in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "self_attn.hook_pattern"):
            assert f"temporal.layers.{i}.{n}" in names
    for n in ("hook_embed", "hook_text_logits", "hook_audio_logits", "hook_resid_final"):
        assert n in names
    assert "depformer.layers.1.self_attn.hook_pattern" in names
    assert names.index("hook_embed") < names.index("temporal.layers.0.hook_resid_pre")
    assert len(names) == len(set(names)) == 11 * (CFG.num_layers + CFG.depformer_num_layers) + 5
    with pytest.raises(ValueError, match="no hook point"):
        run_with_cache(model, random_codes(1, 3), names_filter="temporal.layers.0.hook_nope")


def test_run_with_cache_detaches_and_cleans_up(model: MoshiLM) -> None:
    model.train()
    try:
        codes = random_codes(1, 6)
        out, cache = run_with_cache(model, codes, names_filter=lambda n: "resid" in n)
        assert out.logits.requires_grad
        assert set(cache) == {n for n in model.hook_names() if "resid" in n}
        assert all(not v.requires_grad for v in cache.values())
        assert cache["temporal.layers.0.hook_resid_pre"].shape == (1, 6, CFG.dim)
        assert cache["depformer.layers.0.hook_resid_post"].shape == (
            6,
            CFG.dep_q,
            CFG.depformer_dim,
        )
        assert not any(p.active for p in model.hook_points().values())
        with pytest.raises(ZeroDivisionError), model.hooks([("hook_embed", lambda t, hook: 1 / 0)]):
            model(codes)
        assert not any(p.active for p in model.hook_points().values())
    finally:
        model.eval()


def test_interventions_and_pattern_path(model: MoshiLM) -> None:
    codes = random_codes(2, 20)  # 20 > context 16: the window mask matters
    base = model(codes)
    patterns: dict[str, torch.Tensor] = {}

    def keep(t: torch.Tensor, hook) -> None:
        patterns[hook.name] = t

    with model.hooks([("*.hook_pattern", keep)]):
        eager = model(codes)
    assert len(patterns) == CFG.num_layers + CFG.depformer_num_layers
    assert (eager.logits - base.logits)[base.mask].abs().max() < 1e-5
    assert (eager.text_logits - base.text_logits).abs().max() < 1e-5
    p = patterns["temporal.layers.1.self_attn.hook_pattern"]
    assert p.shape == (2, CFG.num_heads, 20, 20)
    assert torch.allclose(p.sum(-1), torch.ones(2, CFG.num_heads, 20))
    assert (p.triu(1) == 0).all() and (p.tril(-CFG.context) == 0).all()
    # Replacing a tensor changes what follows; a hook returning None changes nothing.
    with model.hooks([("temporal.layers.0.hook_attn_out", lambda t, hook: torch.zeros_like(t))]):
        ablated = model(codes)
    assert (ablated.text_logits - base.text_logits).abs().max() > 1e-3
    with model.hooks([(lambda n: "pattern" not in n, lambda t, hook: None)]):
        same = model(codes)  # (hooking a pattern would switch to the eager path: ~1e-7 apart)
    assert torch.equal(same.text_logits, base.text_logits)


def test_hooks_fire_in_streaming(model: MoshiLM) -> None:
    seen: list[tuple[int, ...]] = []
    with model.hooks(
        [("temporal.layers.0.self_attn.hook_pattern", lambda t, hook: seen.append(tuple(t.shape)))]
    ):
        stream(model, torch.zeros(1, model.n_user, 3, dtype=torch.long))
    assert seen == [(1, CFG.num_heads, 1, n) for n in (1, 2, 3)]


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(model: MoshiLM, tmp_path) -> None:
    path = save_moshi(model, tmp_path / "ckpt" / "model.safetensors")
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    back = load_moshi(path)  # the config travels in the file's metadata
    assert back.cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    fresh = MoshiLM(CFG)
    load_weights(fresh, path)
    codes = random_codes(1, 5)
    assert torch.equal(fresh(codes).text_logits, model(codes).text_logits)
    half = load_moshi(path, CFG, dtype=torch.bfloat16)
    assert half.text_emb.weight.dtype == torch.bfloat16


def test_bad_checkpoints_are_refused_whole(model: MoshiLM, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    good = save_moshi(model, tmp_path / "good.safetensors")
    state = load_file(good)
    del state["text_linear.weight"]
    state["extra.weight"] = torch.zeros(3)
    state["out_norm.alpha"] = torch.ones(1, 1, CFG.dim + 1)
    state["depformer.layers.0.self_attn.in_proj_weight"] = torch.zeros(5, 5)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    target = MoshiLM(CFG)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_weights(target, bad)
    msg = str(err.value)
    for needle in ("1 missing: text_linear.weight", "1 unexpected: extra.weight", "2 mis-shaped"):
        assert needle in msg
    assert "out_norm.alpha" in msg and "Nothing was loaded" in msg
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    with pytest.raises(ValueError, match="mis-shaped"):
        load_moshi(bad, CFG)

    pickled = tmp_path / "model.pt"
    torch.save(model.state_dict(), pickled)
    with pytest.raises(ValueError, match="pickle.*safetensors"):
        load_moshi(pickled, CFG)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pickled.read_bytes())
    with pytest.raises(ValueError, match="pickle"):
        load_weights(target, disguised)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_moshi(garbage, CFG)
    with pytest.raises(FileNotFoundError):
        load_moshi(tmp_path / "absent.safetensors", CFG)
    with pytest.raises(ValueError, match=".safetensors"):
        save_moshi(model, tmp_path / "model.bin")


def test_many_problems_are_truncated(model: MoshiLM, tmp_path) -> None:
    from safetensors.torch import save_file

    save_file({f"junk.{i}": torch.zeros(1) for i in range(40)}, tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match=r"40 unexpected: .* and 28 more") as err:
        load_weights(model, tmp_path / "junk.safetensors")
    assert "missing" in str(err.value)


# ---------------------------------------------------------------- converse


class FakeCodec:
    """A trivial codec following the streaming protocol: frame loudness -> codes, codes -> tones."""

    sample_rate = 24000
    frame_rate = 12.5
    frame_size = 1920
    num_codebooks = 8
    cardinality = 64

    def streaming_encoder(self) -> FakeCodec._Encoder:
        return FakeCodec._Encoder(self)

    def streaming_decoder(self) -> FakeCodec._Decoder:
        return FakeCodec._Decoder(self)

    class _Encoder:
        def __init__(self, codec: FakeCodec) -> None:
            self.codec, self.buf = codec, np.zeros(0, np.float32)

        def _codes(self, frames: np.ndarray) -> np.ndarray:
            level = np.minimum((np.abs(frames).mean(-1) * 500).astype(np.int64), 63)
            return np.stack([(level + k) % 64 for k in range(8)])

        def push(self, samples: np.ndarray) -> np.ndarray:
            self.buf = np.concatenate([self.buf, np.asarray(samples, np.float32)])
            n = self.buf.size // self.codec.frame_size
            frames = self.buf[: n * self.codec.frame_size].reshape(n, -1)
            self.buf = self.buf[n * self.codec.frame_size :]
            return self._codes(frames) if n else np.zeros((8, 0), np.int64)

        def flush(self) -> np.ndarray:
            if self.buf.size == 0:
                return np.zeros((8, 0), np.int64)
            pad = np.zeros(self.codec.frame_size, np.float32)
            pad[: self.buf.size] = self.buf
            self.buf = np.zeros(0, np.float32)
            return self._codes(pad[None])

    class _Decoder:
        def __init__(self, codec: FakeCodec) -> None:
            self.codec = codec

        def step(self, codes_frame: np.ndarray) -> np.ndarray:
            assert codes_frame.shape == (8,) and codes_frame.min() >= 0
            t = np.arange(self.codec.frame_size) / self.codec.sample_rate
            return (0.1 * np.sin(2 * np.pi * (100 + codes_frame[0]) * t)).astype(np.float32)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from moshivis_lab.world.tokenizer import train_tokenizer

    corpus = [
        "the red star is at the top left",
        "hello there what can you see",
        "a small blue circle in the middle of the picture",
        "three plus four is seven have a nice day",
    ] * 5
    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "spm.model", vocab_size=300)


def test_timed_transcript(tokenizer) -> None:
    hello, there = tokenizer.encode("hello"), tokenizer.encode("there")
    stream_ = [TEXT_PAD_ID, *hello, TEXT_PAD_ID, TEXT_EPAD_ID, *there, -1, TEXT_PAD_ID]
    words = timed_transcript(stream_, tokenizer, frame_rate=12.5, first_frame=1)
    start2 = 1 + 1 + len(hello) + 2
    assert words == [
        ("hello", 2 / 12.5, (2 + len(hello)) / 12.5),
        ("there", start2 / 12.5, (start2 + len(there)) / 12.5),
    ]
    pieces = timed_transcript(stream_, tokenizer, 12.5, words=False)
    assert "".join(p for p, _, _ in pieces) == "hellothere"  # a bare "▁" piece has no text
    assert all(abs(e - s - 1 / 12.5) < 1e-9 for _, s, e in pieces)


def test_converse_end_to_end(tokenizer) -> None:
    cfg = dataclasses.replace(CFG, text_card=tokenizer.vocab_size)
    torch.manual_seed(0)
    lm = MoshiLM(cfg).eval()
    rng = np.random.default_rng(0)
    user = (0.1 * rng.standard_normal(16000)).astype(np.float32)  # 1 s at 16 kHz
    codec = FakeCodec()
    wav, transcript = converse(
        lm, codec, tokenizer, user, 16000, extra_seconds=0.4, temperature=1.0, text_temperature=1.0
    )
    n_frames = -(-24000 // 1920) + 5  # resampled user audio + 0.4 s of silence
    assert wav.dtype == np.float32 and wav.shape == (n_frames * 1920,)
    assert np.all(wav[:1920] == 0) and np.abs(wav[1920:]).max() > 0  # first frame: silence
    duration = wav.size / 24000
    assert transcript and all(isinstance(w, str) and w for w, _, _ in transcript)
    assert all(0 < s < e <= duration + 1e-9 for _, s, e in transcript)
    assert [s for _, s, _ in transcript] == sorted(s for _, s, _ in transcript)
    again = converse(
        lm, codec, tokenizer, user, 16000, extra_seconds=0.4, temperature=1.0, text_temperature=1.0
    )
    assert np.array_equal(again.wav, wav) and again.transcript == transcript  # seeded
    with pytest.raises(ValueError, match="cardinality"):
        converse(MoshiLM(dataclasses.replace(cfg, card=32)), codec, tokenizer, user, 16000)


def test_cross_attention_slot_receives_image_kv() -> None:
    torch.manual_seed(0)
    lm = MoshiLM(CFG).eval()
    codes = random_codes(1, 5)
    base = lm(codes)
    calls: list[tuple[tuple[int, ...], object]] = []

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor, cross_kv: object) -> torch.Tensor:
            calls.append((tuple(x.shape), cross_kv))
            return x

    for layer in lm.transformer.layers:
        layer.cross_attention = Probe()
    image_kv = object()
    out = lm(codes, image_kv=image_kv)
    assert calls == [((1, 5, CFG.dim), image_kv)] * CFG.num_layers
    assert torch.equal(out.text_logits, base.text_logits)  # an identity slot changes nothing
    calls.clear()
    with lm.streaming(1):
        lm.step(torch.zeros(1, lm.n_user, dtype=torch.long), image_kv=image_kv)
    assert calls == [((1, 1, CFG.dim), image_kv)] * CFG.num_layers
    assert not any(k.startswith("transformer.layers.0.cross") for k in lm.state_dict())
