"""Oracle image tokens (vision/oracle.py): symbolic tokens read off the scene graph, an ablation."""

from __future__ import annotations

import pytest
import torch

from moshivis_lab.vision.oracle import oracle_tokens
from moshivis_lab.vision.probe import cell_index
from moshivis_lab.world.scenes import Scene, SceneObject


def _scene(sid: str, objects: list[tuple[str, str, str, tuple[int, int]]], word=None) -> Scene:
    objs = [
        SceneObject(shape=s, colour=c, size=z, cell=cell, position="x", bbox=(0, 0, 1, 1))
        for s, c, z, cell in objects
    ]
    return Scene(
        id=sid,
        objects=objs,
        background="white",
        word=word,
        word_cells=[(2, 2)] if word else [],
    )


def test_oracle_tokens_carry_each_object_in_its_cell_only():
    a = _scene("a", [("star", "red", "large", (0, 0)), ("circle", "blue", "small", (1, 2))])
    b = _scene("b", [("star", "red", "large", (1, 2))], word="cat")
    empty = _scene("e", [])
    t = oracle_tokens([a, b, empty], side=9, dim=32)
    assert t.shape == (3, 81, 32) and t.dtype == torch.float32
    cells = torch.from_numpy(cell_index(9))
    # an empty cell holds its position vector alone, the same in every image
    free = cells == 4
    assert torch.equal(t[0, free], t[2, free]) and torch.equal(t[1, free], t[2, free])
    # the same object adds the same vector wherever it is
    star_a = (t[0] - t[2])[cells == 0]
    star_b = (t[1] - t[2])[cells == 5]
    assert torch.allclose(star_a[0], star_b[0])
    assert (star_a - star_a[0]).abs().max() < 1e-5  # every token of the cell carries all of it
    # another object adds another vector; the word's cell adds the word
    circle = (t[0] - t[2])[cells == 5]
    assert not torch.allclose(circle[0], star_b[0])
    assert (t[1] - t[2])[cells == 8].abs().sum() > 0 and (t[0] - t[2])[cells == 8].abs().sum() == 0
    # a pure function of the scenes and the seed
    assert torch.equal(t, oracle_tokens([a, b, empty], side=9, dim=32))
    assert not torch.equal(t, oracle_tokens([a, b, empty], side=9, dim=32, seed=1))


def test_oracle_tokens_refuse_a_grid_coarser_than_the_cells():
    with pytest.raises(ValueError, match="too coarse"):
        oracle_tokens([_scene("a", [])], side=2, dim=8)
    with pytest.raises(ValueError, match="dim"):
        oracle_tokens([_scene("a", [])], side=9, dim=0)


def test_image_token_sources_are_checked(smoke_pretrained):
    from moshivis_lab.train.adapters import TrainConfig
    from moshivis_lab.train.image_tokens import split_tokens
    from moshivis_lab.vision.oracle import oracle_table
    from moshivis_lab.vision.pretrain import load_vision_encoder

    with pytest.raises(ValueError, match="image_tokens"):
        TrainConfig(image_tokens="pixels")
    enc = load_vision_encoder(smoke_pretrained)
    with pytest.raises(ValueError, match="oracle"):
        split_tokens(smoke_pretrained, ["x"], enc, "train", False, "pixels")
    with pytest.raises(KeyError, match="scene graph"):
        oracle_table(smoke_pretrained, ["nowhere_00001"], enc)


def test_oracle_run_trains_and_evaluates_on_oracle_tokens(
    smoke_pretrained, one_torch_thread, evaluate_small
):
    from moshivis_lab.train.adapters import TrainConfig, train_adapters
    from moshivis_lab.train.vis_eval import run_image_tokens

    cfg = smoke_pretrained
    tcfg = TrainConfig.smoke().replace(image_tokens="oracle")
    rep = train_adapters(cfg, tcfg, run="oracle", progress=False, log=lambda *_: None)
    assert rep["finished"] and rep["config"]["image_tokens"] == "oracle"
    assert run_image_tokens(cfg, "oracle") == "oracle"
    assert run_image_tokens(cfg, "never_trained") == "encoder"
    ev = evaluate_small(cfg, "oracle")
    assert ev["image_tokens"] == "oracle"
    assert 0.0 <= ev["test"]["text_prompts"]["vqa_all"]["accuracy"] <= 1.0
