"""Scenes of the synthetic world: vocabulary, sampling invariants, rendering and bounding boxes."""

from __future__ import annotations

import dataclasses
import io
import json
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from moshivis_lab.config import WorldConfig
from moshivis_lab.world import vocab
from moshivis_lab.world.scenes import (
    Scene,
    cell_box,
    object_mask,
    render,
    render_background,
    sample_scene,
)

CFG = WorldConfig()
HELDOUT = frozenset(CFG.heldout_pairs)


def _scenes(seed: int, n: int, cfg: WorldConfig = CFG, **kw) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, cfg, f"s{i:04d}", **kw) for i in range(n)]


def _changed(scene: Scene) -> np.ndarray:
    img = np.asarray(render(scene)).astype(int)
    bg = np.asarray(render_background(scene)).astype(int)
    return np.abs(img - bg).max(axis=-1) > 0


# ------------------------------------------------------------------------------------ vocab


def test_vocab_sizes_and_heldout_pairs():
    assert len(vocab.SHAPES) >= 8 and len(set(vocab.SHAPES)) == len(vocab.SHAPES)
    assert len(vocab.COLOURS) >= 8
    assert len(vocab.SIZES) >= 2
    assert len(vocab.BACKGROUNDS) >= 6
    assert len(set(vocab.WORDS)) >= 40 and len(set(vocab.WORDS)) == len(vocab.WORDS)
    assert vocab.NUMBER_WORDS[0] == "zero" and vocab.NUMBER_WORDS[20] == "twenty"
    assert len(vocab.POSITION_NAMES) == 9
    assert set(vocab.SHAPE_PLURALS) == set(vocab.SHAPES)
    for colour, shape in CFG.heldout_pairs:
        assert colour in vocab.COLOURS and shape in vocab.SHAPES
    closed = set(vocab.SHAPES) | set(vocab.COLOURS) | set(vocab.SIZES) | set(vocab.NUMBER_WORDS)
    assert not closed & set(vocab.WORDS), "OCR words must not be attribute words"
    for w in vocab.WORDS:
        assert w.isascii() and w.isalpha() and w.islower()
    with pytest.raises(ValueError):
        vocab.number_word(21)


def test_colours_are_far_apart():
    cols = np.array(list(vocab.COLOURS.values()), dtype=float)
    d = np.sqrt(((cols[:, None] - cols[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    assert d.min() > 60, d.min()


# ------------------------------------------------------------------------------- sampling


def test_same_seed_same_scene_json_and_image_bytes():
    a, b = _scenes(7, 20), _scenes(7, 20)
    assert [s.to_json() for s in a] == [s.to_json() for s in b]
    for x, y in zip(a, b, strict=True):
        assert render(x).tobytes() == render(y).tobytes()
    c = _scenes(8, 20)
    assert [s.to_json() for s in a] != [s.to_json() for s in c]


def test_json_round_trip_is_exact():
    for s in _scenes(1, 50, dataclasses.replace(CFG, p_word=0.5)):
        d = json.loads(json.dumps(s.to_json()))
        assert Scene.from_json(d) == s
        assert render(Scene.from_json(d)).tobytes() == render(s).tobytes()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_scene_invariants(seed):
    (s,) = _scenes(seed, 1, dataclasses.replace(CFG, p_word=0.5), forbid_pairs=HELDOUT)
    assert CFG.min_objects <= len(s.objects) <= CFG.max_objects
    cells = [o.cell for o in s.objects]
    assert len(set(cells)) == len(cells) and cells == sorted(cells)
    assert len(s.pairs) == len(s.objects), "colour-shape pairs are unique in a scene"
    assert not s.pairs & HELDOUT
    assert s.background in vocab.BACKGROUNDS
    for o in s.objects:
        assert o.shape in vocab.SHAPES and o.colour in vocab.COLOURS and o.size in vocab.SIZES
        assert o.position == vocab.POSITION_NAMES[o.cell]
        cx0, cy0, cx1, cy1 = cell_box(o.cell, s.image_size)
        x0, y0, x1, y1 = o.bbox
        assert cx0 <= x0 < x1 <= cx1 and cy0 <= y0 < y1 <= cy1, (o, (cx0, cy0, cx1, cy1))
    if s.word is not None:
        assert s.word in vocab.WORDS and s.word_colour in vocab.COLOURS
        assert s.word_cells and not set(s.word_cells) & set(cells)
        x0, y0, x1, y1 = s.word_bbox
        boxes = [cell_box(c, s.image_size) for c in s.word_cells]
        assert min(b[0] for b in boxes) <= x0 < x1 <= max(b[2] for b in boxes)
        assert min(b[1] for b in boxes) <= y0 < y1 <= max(b[3] for b in boxes)
    else:
        assert s.word_bbox is None and s.word_colour is None and not s.word_cells


def test_forbid_and_require_pairs():
    for s in _scenes(3, 300, forbid_pairs=HELDOUT):
        assert not s.pairs & HELDOUT
    for pair in CFG.heldout_pairs:
        for s in _scenes(4, 30, require_pair=pair, forbid_pairs=HELDOUT - {pair}):
            assert pair in s.pairs
            assert not s.pairs & (HELDOUT - {pair})
    # Forbidding all but a handful of pairs still works; forbidding too many is an error.
    everything = {(c, sh) for c in vocab.COLOURS for sh in vocab.SHAPES}
    keep = {
        ("red", "circle"),
        ("blue", "star"),
        ("green", "cross"),
        ("white", "heart"),
        ("pink", "square"),
    }
    for s in _scenes(5, 20, forbid_pairs=frozenset(everything - keep)):
        assert s.pairs <= keep
    with pytest.raises(ValueError):
        _scenes(5, 1, forbid_pairs=frozenset(everything - {("red", "circle")}))
    with pytest.raises(ValueError):
        _scenes(5, 1, require_pair=("red", "star"), forbid_pairs=HELDOUT)


def test_word_frequency_follows_p_word():
    n = 400
    share = sum(s.word is not None for s in _scenes(6, n)) / n
    assert abs(share - CFG.p_word) < 0.08, share
    assert all(s.word is None for s in _scenes(6, 50, dataclasses.replace(CFG, p_word=0.0)))
    always = _scenes(6, 50, dataclasses.replace(CFG, p_word=1.0))
    assert all(s.word is not None for s in always)
    # Large enough to read: at least 14 px of ink height at 224 px, most spanning two cells.
    assert all(s.word_bbox[3] - s.word_bbox[1] >= 14 for s in always)


@pytest.mark.parametrize("size", [64, 96, 448])
def test_other_image_sizes(size):
    cfg = dataclasses.replace(CFG, image_size=size, p_word=0.8)
    for s in _scenes(9, 8, cfg):
        assert render(s).size == (size, size)
        _check_boxes(s)


# ------------------------------------------------------------------------------ rendering


def test_render_is_rgb_square_and_pure():
    s = _scenes(2, 1)[0]
    im = render(s)
    assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (224, 224)
    assert render(s).tobytes() == im.tobytes()


def _check_boxes(s: Scene) -> None:
    changed = _changed(s)
    inside = np.zeros_like(changed)
    img = np.asarray(render(s))
    for k, o in enumerate(s.objects):
        x0, y0, x1, y1 = o.bbox
        inside[y0:y1, x0:x1] = True
        m = object_mask(s, k)
        assert m.any()
        ys, xs = np.nonzero(m)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == o.bbox, "mask box == bbox"
        # Every pixel of the object differs from the background ...
        assert changed[m].all()
        # ... each edge row and column of the box holds some of them ...
        box = changed[y0:y1, x0:x1]
        assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
        # ... a good share of the box is the object, whose core has exactly its colour.
        assert box.mean() > 0.3
        core = m & (np.abs(img.astype(int) - vocab.COLOURS[o.colour]).max(-1) == 0)
        assert core.sum() > (0.5 if min(x1 - x0, y1 - y0) >= 16 else 0.1) * m.sum()
    if s.word_bbox:
        x0, y0, x1, y1 = s.word_bbox
        inside[y0:y1, x0:x1] = True
        box = changed[y0:y1, x0:x1]
        assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
    # No drawn pixel falls outside the boxes.
    assert not (changed & ~inside).any()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_bboxes_tightly_enclose_every_drawn_pixel(seed):
    (s,) = _scenes(seed, 1, dataclasses.replace(CFG, p_word=0.6))
    _check_boxes(s)


def test_objects_are_visible_on_every_background():
    """Every colour differs from every background pixel by a clear margin on some channel."""
    for bg in vocab.BACKGROUNDS:
        s = Scene("x", [], bg, image_size=224, background_seed=3)
        arr = np.asarray(render_background(s)).reshape(-1, 3).astype(int)
        for name, rgb in vocab.COLOURS.items():
            gap = np.abs(arr - np.array(rgb)).max(-1).min()
            assert gap >= 40, (bg, name, gap)


def test_render_and_save_speed():
    scenes = _scenes(11, 100, forbid_pairs=HELDOUT)
    t0 = time.perf_counter()
    for s in scenes:
        buf = io.BytesIO()
        render(s).save(buf, format="PNG")
    per_minute = 100 / (time.perf_counter() - t0) * 60
    assert per_minute > 2000, per_minute
