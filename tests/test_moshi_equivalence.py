"""Our MoshiLM against Kyutai's `moshi` package (a test-only reference): same weights, same numbers.

Skipped when `moshi` cannot be imported (install it with `pip install --no-deps moshi==0.2.13`).
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi is imported

import pytest
import torch

try:
    from moshi.models import loaders as moshi_loaders
    from moshi.models.lm import LMGen, LMModel
except Exception as e:  # noqa: BLE001 - any import failure means: no reference here
    pytest.skip(
        f"the reference package `moshi` is not importable ({e}); "
        "install it with `pip install --no-deps moshi==0.2.13`",
        allow_module_level=True,
    )

from moshivis_lab.config import LMConfig
from moshivis_lab.model import MoshiLM, count_parameters, load_moshi, save_moshi
from moshivis_lab.model.checkpoint import moshi_lm_kwargs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TOL = 1e-4


def pair(cfg: LMConfig, seed: int = 0) -> tuple[LMModel, MoshiLM]:
    torch.manual_seed(seed)
    ref = LMModel(**moshi_lm_kwargs(cfg)).eval()
    with torch.no_grad():  # moshi leaves some weights at PyTorch defaults; make all non-trivial
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = MoshiLM(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


# The tiny preset, and the same with a short context so the sliding window is exercised.
CONFIGS = {
    "tiny": LMConfig.tiny(),
    "tiny-context12": dataclasses.replace(LMConfig.tiny(), context=12),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request: pytest.FixtureRequest) -> tuple[LMConfig, LMModel, MoshiLM]:
    cfg = CONFIGS[request.param]
    return (cfg, *pair(cfg))


def random_codes(cfg: LMConfig, b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.card, (b, cfg.num_codebooks, t), generator=g)
    codes[:, 0] = torch.randint(0, cfg.text_card, (b, t), generator=g)
    codes[0, 4, 3:9] = -1  # some zero tokens
    codes[-1, 0, 5] = -1
    return codes


def test_state_dict_names_and_shapes_equal(models) -> None:
    _, ref, ours = models
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs


def test_training_forward_matches(models) -> None:
    cfg, ref, ours = models
    codes = random_codes(cfg, 2, 30)
    with torch.no_grad():
        a, b = ref(codes), ours(codes)
    assert torch.equal(a.text_mask, b.text_mask) and torch.equal(a.mask, b.mask)
    assert a.text_logits.shape == b.text_logits.shape and a.logits.shape == b.logits.shape
    text_diff = (a.text_logits - b.text_logits)[b.text_mask].abs().max().item()
    audio_diff = (a.logits - b.logits)[b.mask].abs().max().item()
    print(f"forward max abs diff: text {text_diff:.2e}, audio {audio_diff:.2e}")
    assert text_diff <= TOL and audio_diff <= TOL


def test_streaming_matches_lmgen(models) -> None:
    cfg, ref, ours = models
    b, steps = 2, 20
    g = torch.Generator().manual_seed(2)
    user = torch.randint(0, cfg.card, (b, cfg.n_q - cfg.dep_q, steps), generator=g)

    ref_text, ref_audio, ref_out = [], [], []
    gen = LMGen(ref, use_sampling=False, temp=0.0, temp_text=0.0)
    gen.on_text_logits_hook = lambda logits: ref_text.append(logits[:, 0, 0].clone())
    heads: list[torch.Tensor] = []
    handles = [
        lin.register_forward_hook(lambda m, i, o: heads.append(o[:, 0].clone()))
        for lin in ref.linears
    ]
    try:
        with gen.streaming(b):
            for j in range(steps):
                heads.clear()
                ref_out.append(gen.step(user[:, :, j : j + 1]))
                ref_audio.append(torch.stack(heads, dim=1))
    finally:
        for h in handles:
            h.remove()

    text_diff = audio_diff = 0.0
    with ours.streaming(b, temperature=0.0, text_temperature=0.0) as st:
        for j in range(steps):
            text, audio = ours.step(user[:, :, j])
            if ref_out[j] is None:
                assert (text == -1).all() and (audio == -1).all()
            else:
                assert torch.equal(text, ref_out[j][:, 0, 0]), j
                assert torch.equal(audio, ref_out[j][:, 1:, 0]), j
            text_diff = max(text_diff, (st.text_logits - ref_text[j]).abs().max().item())
            audio_diff = max(audio_diff, (st.audio_logits - ref_audio[j]).abs().max().item())
    print(f"streaming max abs diff: text {text_diff:.2e}, audio {audio_diff:.2e}")
    assert text_diff <= TOL and audio_diff <= TOL


def test_moshi_reads_our_checkpoint_and_we_read_theirs(tmp_path) -> None:
    from safetensors.torch import save_file

    cfg = LMConfig.tiny()
    ref, ours = pair(cfg, seed=3)
    codes = random_codes(cfg, 1, 12)
    path = save_moshi(ours, tmp_path / "model.safetensors")
    theirs = moshi_loaders.get_moshi_lm(
        path, lm_kwargs=moshi_lm_kwargs(cfg), device="cpu", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        a, b = theirs(codes), ours(codes)
    assert (a.logits - b.logits)[b.mask].abs().max() <= TOL
    assert (a.text_logits - b.text_logits)[b.text_mask].abs().max() <= TOL
    # moshi's own state dict (module layout) saved as safetensors loads into ours.
    save_file(
        {k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "ref.safetensors"
    )
    back = load_moshi(tmp_path / "ref.safetensors", cfg)
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_7b_parameter_count_and_names_on_meta() -> None:
    kwargs = dict(moshi_loaders._lm_kwargs)
    ref = LMModel(device="meta", dtype=torch.bfloat16, **kwargs)
    ref_count = sum(p.numel() for p in ref.parameters())
    cfg = LMConfig.moshi_7b()
    assert count_parameters(cfg) == ref_count == 7_687_729_152
    assert moshi_lm_kwargs(cfg) | kwargs == moshi_lm_kwargs(
        cfg
    )  # our mirror of the released kwargs
    with torch.device("meta"):
        ours = MoshiLM(cfg)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
