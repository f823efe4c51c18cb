"""The referent-blind baseline beside each question type of the evaluation."""

from __future__ import annotations

from collections import Counter

from moshivis_lab.train.vis_eval import REFERENT_ATTRIBUTES, referent_blind, task_items
from moshivis_lab.world.generate import load_scenes


def test_referent_blind_scores_the_scene_majority(smoke_world):
    cfg = smoke_world
    items = [it for it in task_items(cfg, "test") if it["task"] != "caption"]
    rep = referent_blind(cfg, items)
    scenes = {sc.id: sc for split in load_scenes(cfg).values() for sc in split}
    for r in rep.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] >= 1
    attr_types = [k for k in rep if k.startswith("vqa/") and k[4:] in REFERENT_ATTRIBUTES]
    assert attr_types, "the smoke test split asks attribute questions"
    kind = attr_types[0]
    attr = kind[4:]
    want = []
    for it in items:
        if it["type"] != kind:
            continue
        c = Counter(getattr(o, attr) for o in scenes[it["image_id"]].objects)
        best = [v for v, n in c.items() if n == max(c.values())]
        want.append((it["answer"] in best) / len(best))
    assert abs(rep[kind]["accuracy"] - sum(want) / len(want)) < 1e-12
    assert rep[kind]["rule"] == "the scene's most common value"
    others = [k for k in rep if k not in attr_types and k != "vqa_all"]
    assert all(rep[k]["rule"] == "the train majority answer" for k in others)
    # one object per scene: the referent-blind answerer is always right on attribute questions
    one = [it for it in items if len(scenes[it["image_id"]].objects) == 1 and it["type"] == kind]
    if one:
        assert referent_blind(cfg, one)[kind]["accuracy"] == 1.0
