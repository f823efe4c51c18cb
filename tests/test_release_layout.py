"""The architecture of a released-layout checkpoint, read from its tensors' names and shapes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from moshivis_lab.config import LMConfig, MoshiVisConfig, XAConfig
from moshivis_lab.model.moshivis import MoshiVis
from moshivis_lab.model.release_layout import infer_from_shapes, infer_moshivis_config
from moshivis_lab.model.vis_checkpoint import released_shapes, save_moshivis
from moshivis_lab.vision.config import VisionConfig
from moshivis_lab.vision.encoder import ImageEncoder

DATA = Path(__file__).parent / "data" / "kyuteye"


def shapes_of(cfg: MoshiVisConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return released_shapes(MoshiVis(cfg))


def test_the_release_reads_back_as_the_moshika_vis_preset() -> None:
    """kyuteye's own list of the release's tensors (committed data) gives the preset back."""
    ref = json.loads((DATA / "moshika_vis_tensors.json").read_text())
    shapes = {k: tuple(v["shape"]) for k, v in {**ref["tensors"], **ref["encoder_tensors"]}.items()}
    arch = infer_from_shapes(shapes)
    assert arch.config == MoshiVisConfig.moshika_vis()
    v = VisionConfig.siglip_gemma2_448()
    assert arch.vision == {
        "hidden_size": v.hidden_size,
        "patch_size": v.patch_size,
        "image_size": v.image_size,
        "num_layers": v.num_layers,
        "intermediate_size": v.intermediate_size,
    }
    assert {"num_heads", "delays", "context", "gate_readout"} <= set(arch.assumed)
    assert {"dim", "num_layers", "xa_layers", "sharing", "image_dim"} <= set(arch.read)
    assert "taken from the template" in arch.summary()


SMALL = LMConfig(
    dim=64, num_layers=5, num_heads=4, text_card=50, card=24, n_q=6, dep_q=3,
    delays=(0, 0, 1, 1, 0, 1, 1), depformer_dim=32, depformer_num_layers=2, depformer_num_heads=2,
)  # fmt: skip


@pytest.mark.parametrize(
    "xa",
    [
        {},
        {"xa_layers": (1, 3)},
        {"sharing": "none"},
        {"sharing": "kv"},
        {"gate_shared": True},
        {"gating": "none"},
        {"gating": "tanh_scalar", "xa_layers": (4,)},
    ],
)
def test_smaller_models_in_the_same_layout_read_back(xa: dict) -> None:
    """Widths, depths, vocabularies, rows, which layers cross-attend, what is shared."""
    tpl = MoshiVisConfig.moshika_vis()
    cfg = MoshiVisConfig(lm=SMALL, xa=dataclasses.replace(tpl.xa, image_dim=40, **xa))
    arch = infer_from_shapes(shapes_of(cfg), tpl)
    got = arch.config
    for name in ("dim", "num_layers", "text_card", "card", "n_q", "dep_q", "depformer_dim",
                 "depformer_num_layers", "dim_feedforward", "depformer_dim_feedforward"):  # fmt: skip
        assert getattr(got.lm, name) == getattr(cfg.lm, name), name
    assert got.lm.delays == SMALL.delays  # Moshi's delay pattern, assumed
    # heads are not in the shapes: the template's head width (128 / 64) does not divide 64 / 32,
    # so the template's counts are taken, and the report says so
    assert (got.lm.num_heads, got.lm.depformer_num_heads) == (32, 16)
    assert "template's count" in arch.assumed["num_heads"]
    assert got.layers == cfg.layers
    for name in ("sharing", "gate_shared", "gating", "image_dim"):
        assert getattr(got.xa, name) == getattr(cfg.xa, name), name
    with torch.device("meta"):
        assert released_shapes(MoshiVis(got)) == shapes_of(cfg)


def test_a_file_is_read_from_its_header_and_bad_files_say_so(tmp_path: Path) -> None:
    lm = dataclasses.replace(SMALL, num_heads=1, depformer_num_heads=1)
    cfg = MoshiVisConfig(lm=lm, xa=XAConfig(image_dim=16))
    torch.manual_seed(0)
    path = save_moshivis(MoshiVis(cfg), tmp_path / "model.safetensors")
    enc = ImageEncoder.from_config(
        VisionConfig(
            name="t",
            image_size=28,
            patch_size=14,
            hidden_size=16,
            num_layers=2,
            num_heads=2,
            intermediate_size=24,
        )  # fmt: skip
    )
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    state.update({f"image_prefix.enc.model.{k}": v for k, v in enc.model.state_dict().items()})
    save_file(state, path)
    arch = infer_moshivis_config(path)
    assert arch.config.lm.dim == 64 and arch.config.layers == cfg.layers
    assert arch.vision == {"hidden_size": 16, "patch_size": 14, "image_size": 28,
                           "num_layers": 2, "intermediate_size": 24}  # fmt: skip
    del state["llm.text_emb.weight"]
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="llm.text_emb.weight.*released"):
        infer_moshivis_config(tmp_path / "bad.safetensors")
