"""The lab configured as the release computes what Kyutai's released PyTorch code computes.

The reference data in ``tests/data/kyuteye/`` was written by kyutai-labs/moshivis' own
``kyuteye_pt`` through ``scripts/kyuteye_reference.py`` (rerun it to refresh): the names and
shapes of the released model as kyuteye builds it, and a tiny random kyuteye model saved as a user
would save it, with kyuteye's outputs on fixed inputs. The lab reads that file and must match.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moshivis_lab.config import LMConfig, MoshiVisConfig, XAConfig
from moshivis_lab.model.moshivis import MoshiVis, reported_gate
from moshivis_lab.model.vis_checkpoint import (
    load_moshivis,
    released_shapes,
    save_moshivis,
    shared_aliases,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = Path(__file__).parent / "data" / "kyuteye"
TOL = 1e-4


def tiny_release_config(**xa: object) -> MoshiVisConfig:
    """The lab's config for the tiny kyuteye model of ``tiny/config.json``, as the release."""
    k = json.loads((DATA / "tiny" / "config.json").read_text())
    lm = LMConfig(
        dim=k["dim"],
        num_layers=k["num_layers"],
        num_heads=k["num_heads"],
        hidden_scale=k["hidden_scale"],
        context=k["context"],
        max_period=float(k["max_period"]),
        text_card=k["text_card"],
        card=k["audio_card"],
        n_q=k["n_q"],
        dep_q=k["dep_q"],
        delays=tuple(k["delays"]),
        depformer_dim=k["depformer_dim"],
        depformer_num_layers=k["depformer_num_layers"],
        depformer_num_heads=k["depformer_num_heads"],
        depformer_hidden_scale=k["depformer_dim_feedforward"] / k["depformer_dim"],
        depformer_weights_per_step=k["depformer_weights_per_step"],
        depformer_multi_linear=k["depformer_multi_linear"],
        depformer_norm="variance",
    )
    release = XAConfig.moshika_vis()
    fields = {
        "image_dim": 1152,
        "xa_start": 0,
        "norm_xa": release.norm_xa,
        "norm_xa_eps": release.norm_xa_eps,
        "norm_xa_fp32": release.norm_xa_fp32,
        "gate_readout": release.gate_readout,
        **xa,
    }
    return MoshiVisConfig(lm=lm, xa=XAConfig(**fields))


def run_lab(cfg: MoshiVisConfig) -> dict[str, torch.Tensor]:
    """The lab's outputs on the reference inputs, reading kyuteye's file."""
    ref = load_file(str(DATA / "tiny" / "reference.safetensors"))
    model = load_moshivis(DATA / "tiny" / "model.safetensors", cfg)
    with torch.no_grad():
        image = model.image_prefix(ref["encoded"])
        out = model(ref["codes"], image_tokens=ref["encoded"])
        blind = model(ref["codes"], image_kv=None)
    return {"image": image, "out": out, "blind": blind, **{"ref_" + k: v for k, v in ref.items()}}


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    d = (a.float() - b.float()).abs()
    return float(d[mask].max() if mask is not None else d.max())


def test_released_layout_has_kyuteye_names_and_shapes() -> None:
    """All 456 model tensors of moshika-vis, built on the meta device, against kyuteye's list."""
    ref = json.loads((DATA / "moshika_vis_tensors.json").read_text())["tensors"]
    assert len(ref) == 456
    with torch.device("meta"):
        model = MoshiVis(MoshiVisConfig.moshika_vis())
    ours = released_shapes(model)
    assert sorted(set(ref) - set(ours)) == [], "tensors kyuteye has and the lab does not"
    assert sorted(set(ours) - set(ref)) == [], "tensors the lab writes and kyuteye does not"
    wrong = {k: (ref[k]["shape"], list(s)) for k, s in ours.items() if list(s) != ref[k]["shape"]}
    assert wrong == {}
    assert {v["dtype"] for v in ref.values()} == {"bfloat16"}


def test_lab_as_the_release_computes_what_kyuteye_computes() -> None:
    """Image K/V source, text logits, every depformer logit and the reported gate within 1e-4."""
    r = run_lab(tiny_release_config())
    out = r["out"]
    assert max_diff(r["image"], r["ref_image"]) < TOL
    text = out.text_logits[:, 0]
    valid = out.text_mask[:, 0]
    assert valid.any()
    assert max_diff(text, r["ref_text_logits"], valid) < TOL
    # kyuteye's depformer logits are on the delayed grid; the lab's are undelayed.
    delays = tiny_release_config().lm.delays
    for cb in range(out.logits.shape[1]):
        d = delays[1 + cb]
        ours = out.logits[:, cb, : out.logits.shape[2] - d]
        theirs = r["ref_audio_logits"][:, cb, d:]
        assert max_diff(ours, theirs) < TOL, f"depformer step {cb}"
    # kyuteye reports one gate per step, averaged over the batch
    assert max_diff(out.gate_score().mean(0), r["ref_gate"]) < TOL
    assert float(r["ref_gate"].min()) > 0.05  # the gates are open enough to matter
    # Without an image kyuteye reports 0, as the lab does.
    assert float(r["ref_gate_without_image"].abs().max()) == 0.0
    assert float(r["blind"].gate_score().abs().max()) == 0.0


@pytest.mark.parametrize(
    ("lm_change", "xa_change", "what"),
    [
        ({}, {"norm_xa": "mean_square", "norm_xa_eps": None, "norm_xa_fp32": True}, "image"),
        ({"depformer_norm": "mean_square"}, {}, "audio"),
    ],
)
def test_each_kyuteye_choice_is_a_named_option_that_matters(
    lm_change: dict, xa_change: dict, what: str
) -> None:
    """Switching one field back to the lab's default moves that output off kyuteye's (the gate
    readouts agree on this model, whose 4 layers all cross-attend: see the readout test)."""
    base = tiny_release_config()
    cfg = dataclasses.replace(
        base,
        lm=dataclasses.replace(base.lm, **lm_change),
        xa=dataclasses.replace(base.xa, **xa_change),
    )
    r = run_lab(cfg)
    if what == "image":
        assert max_diff(r["image"], r["ref_image"]) > 1e-3
    else:
        assert max_diff(r["out"].logits[:, 0], r["ref_audio_logits"][:, 0]) > 1e-3


def test_reported_gate_readouts() -> None:
    """The lab's mean of the last 10 xa layers against kyuteye's sum over the last 10 layer
    indices divided by min(10, layers), on hand-made gates."""
    layers = tuple(range(12))
    g = torch.arange(12, dtype=torch.float32)[None, :, None].expand(1, 12, 3)
    assert torch.allclose(reported_gate(g, layers), torch.full((1, 3), 6.5))
    assert torch.allclose(reported_gate(g, layers, 12, "kyuteye"), torch.full((1, 3), 6.5))
    # Cross-attention only in layers 0 and 11 of 12: kyuteye counts layer 11 alone, over 10.
    two = g[:, [0, 11]]
    assert torch.allclose(reported_gate(two, (0, 11), 12, "kyuteye"), torch.full((1, 3), 1.1))
    assert torch.allclose(reported_gate(two, (0, 11)), torch.full((1, 3), 5.5))
    with pytest.raises(ValueError, match="readout"):
        reported_gate(g, layers, 12, "paper")
    with pytest.raises(ValueError, match="layers"):
        reported_gate(g, layers[:3])


def test_kyuteye_readout_is_zero_without_a_gate_and_before_per_layer_alpha() -> None:
    lm = LMConfig(dim=32, num_layers=2, num_heads=2, depformer_dim=16, depformer_num_heads=2)
    torch.manual_seed(0)
    codes = torch.randint(0, 200, (1, 17, 5))
    tokens = torch.randn(1, 4, 8)
    for readout, expect in (("kyuteye", 0.0), ("lab", 1.0)):
        m = MoshiVis(
            MoshiVisConfig(lm=lm, xa=XAConfig(image_dim=8, gating="none", gate_readout=readout))
        )
        with torch.no_grad():
            assert float(m(codes, image_tokens=tokens).gate_score().mean()) == expect
    # one cross-attention layer: its input does not depend on per_layer_alpha
    shared = XAConfig(image_dim=8, gate_shared=True, gate_readout="kyuteye", xa_layers=(1,))
    m = MoshiVis(MoshiVisConfig(lm=lm, xa=shared))
    with torch.no_grad():
        before = m(codes, image_tokens=tokens).gate_score()
        for a in m.adapters:
            a.per_layer_alpha.fill_(3.0)
        after = m(codes, image_tokens=tokens).gate_score()
    assert torch.allclose(before, after)


def test_shared_gate_checkpoints_cross_both_ways(tmp_path: Path) -> None:
    """kyuteye's shared gate sits in every layer (its loader needs all copies); the lab stores it
    once. The lab writes kyuteye's layout on request and reads both; copies that differ fail."""
    lm = LMConfig(dim=32, num_layers=3, num_heads=2, depformer_dim=16, depformer_num_heads=2)
    cfg = MoshiVisConfig(lm=lm, xa=XAConfig(image_dim=8, gate_shared=True))
    torch.manual_seed(0)
    model = MoshiVis(cfg)
    aliases = shared_aliases(model)
    gate_copies = [k for k in aliases if ".cross_attention.gate." in k]
    assert len(gate_copies) == 2 * 2  # two weights, layers 1 and 2
    for layout in ("lab", "kyuteye"):
        path = save_moshivis(model, tmp_path / f"{layout}.safetensors", layout=layout)
        with safe_open(str(path), "pt") as f:
            names = set(f.keys())
        assert set(gate_copies) <= names if layout == "kyuteye" else not names & set(aliases)
        back = load_moshivis(path, cfg)
        for (k, a), (_, b) in zip(
            model.state_dict().items(), back.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), k
    # A file whose "shared" copies differ is not a shared-gate checkpoint: refused, named.
    state = load_file(str(tmp_path / "kyuteye.safetensors"))
    state[gate_copies[0]] = state[gate_copies[0]] + 1
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="do not share|does not share"):
        load_moshivis(tmp_path / "bad.safetensors", cfg)
