"""World stages 1-2: scenes (PNG + scene graphs), then tasks and dialogues in real dataset formats."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from moshivis_lab.artefacts import Stage, atomic_path, config_hash, read_json, write_json
from moshivis_lab.config import LabConfig
from moshivis_lab.world import dialogues as dlg
from moshivis_lab.world import formats, scenes, tasks
from moshivis_lab.world.build import SPLITS, item_rng, pool_map, split_sizes

TASKS = ("caption", "vqa", "ocr", "count")
# Share of each task among the speechless image-text samples (OCR only where a word exists).
TASK_WEIGHTS = {"caption": 0.25, "vqa": 0.35, "ocr": 0.15, "count": 0.25}


def _pick_task_item(items: list[tasks.TaskItem], rng) -> tasks.TaskItem:  # noqa: ANN001
    """Pick a task by ``TASK_WEIGHTS`` (among those the scene offers), then one of its items."""
    by_task: dict[str, list[tasks.TaskItem]] = {}
    for it in items:
        by_task.setdefault(it.task, []).append(it)
    names = [t for t in TASKS if t in by_task]
    w = [TASK_WEIGHTS[t] for t in names]
    task = names[int(rng.choice(len(names), p=[x / sum(w) for x in w]))]
    return by_task[task][int(rng.integers(len(by_task[task])))]


def image_ids(cfg: LabConfig) -> dict[str, list[str]]:
    """The image ids of each split (``train_00000`` ...)."""
    w = cfg.world
    n = {
        "train": w.n_train_images,
        "val": w.n_val_images,
        "test": w.n_test_images,
        "heldout": w.n_heldout_images,
    }
    return {s: [f"{s}_{i:05d}" for i in range(n[s])] for s in SPLITS}


def _scene_for(cfg: LabConfig, split: str, index: int) -> scenes.Scene:
    rng = item_rng(cfg, "scenes", split, index)
    pairs = frozenset(tuple(p) for p in cfg.world.heldout_pairs)
    sid = f"{split}_{index:05d}"
    if split == "heldout":
        pair = cfg.world.heldout_pairs[index % len(cfg.world.heldout_pairs)]
        return scenes.sample_scene(rng, cfg.world, sid, require_pair=tuple(pair))
    return scenes.sample_scene(rng, cfg.world, sid, forbid_pairs=pairs)


def _render_job(job: tuple[str, int], cfg: LabConfig) -> dict:
    split, index = job
    scene = _scene_for(cfg, split, index)
    path = cfg.world_dir / "images" / f"{scene.id}.png"
    with atomic_path(path) as tmp:
        scenes.render(scene).save(tmp, format="PNG", optimize=False)
    return scene.to_json()


def build_scenes(cfg: LabConfig, progress: bool = True) -> dict:
    """Stage 1: sample and render every scene; write ``scenes.json`` (scene graphs by split)."""
    stage = Stage(cfg.world_dir, "scenes", config_hash(cfg.world))
    if stage.done:
        return stage.info()
    t0 = time.time()
    jobs = [(s, i) for s, ids in image_ids(cfg).items() for i in range(len(ids))]
    graphs = pool_map(
        partial(_render_job, cfg=cfg), jobs, cfg.workers, "scenes", progress, chunksize=32
    )
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for (s, _), g in zip(jobs, graphs, strict=True):
        by_split[s].append(g)
    write_json(
        cfg.world_dir / "scenes.json", {"image_size": cfg.world.image_size, "splits": by_split}
    )
    return stage.finish(seconds=round(time.time() - t0, 2), images=len(jobs))


def load_scenes(cfg: LabConfig) -> dict[str, list[scenes.Scene]]:
    """The scene graphs of every split, as ``Scene`` objects."""
    d = read_json(cfg.world_dir / "scenes.json")
    return {s: [scenes.Scene.from_json(g) for g in d["splits"][s]] for s in SPLITS}


def _images_block(split_scenes: list[scenes.Scene]) -> list[dict]:
    return [
        {"id": sc.id, "file_name": f"{sc.id}.png", "width": sc.image_size, "height": sc.image_size}
        for sc in split_scenes
    ]


def build_texts(cfg: LabConfig, progress: bool = True) -> dict:
    """Stage 2: tasks (COCO/VQA files), image dialogues (LLaVA) and chit-chat dialogues, by split."""
    stage = Stage(cfg.world_dir, "texts", config_hash(cfg.world))
    if stage.done:
        return stage.info()
    t0 = time.time()
    all_scenes = load_scenes(cfg)
    w = cfg.world
    weights = [len(all_scenes[s]) for s in SPLITS]
    n_samples = dict(zip(SPLITS, split_sizes(w.n_image_text_samples, weights), strict=True))
    n_dialogues = dict(zip(SPLITS, split_sizes(w.n_image_dialogues, weights), strict=True))
    n_spoken = dict(zip(SPLITS, split_sizes(w.n_spoken_image_dialogues, weights), strict=True))
    chat_w = [1 - w.val_fraction - w.test_fraction, w.val_fraction, w.test_fraction, 0]
    n_chat = dict(
        zip(
            SPLITS,
            split_sizes(w.n_chitchat_dialogues, [int(1000 * x) for x in chat_w]),
            strict=True,
        )
    )
    counts: dict[str, dict] = {}
    for split in SPLITS:
        sc = all_scenes[split]
        images = _images_block(sc)
        per_task: dict[str, list[dict]] = {t: [] for t in TASKS}
        for i in range(n_samples[split]):
            scene = sc[i % len(sc)]
            rng = item_rng(cfg, "tasks", split, i)
            it = _pick_task_item(tasks.make_tasks(scene, rng), rng)
            per_task[it.task].append(
                {
                    "image_id": scene.id,
                    "question": it.question,
                    "answer": it.answer,
                    "answer_type": it.answer_type,
                    "refs": list(it.refs),
                }
            )
        formats.write_coco_captions(
            cfg.world_dir / f"captions_{split}.json",
            images,
            [{"image_id": x["image_id"], "caption": x["answer"]} for x in per_task["caption"]],
        )
        for t in ("vqa", "ocr", "count"):
            formats.write_vqa(cfg.world_dir / f"{t}_{split}", images, per_task[t], t)
        records = []
        for i in range(n_dialogues[split]):
            scene = sc[i % len(sc)] if sc else None
            if scene is None:
                break
            rng = item_rng(cfg, "dialogues", split, i)
            kind = dlg.DIALOGUE_KINDS[i % len(dlg.DIALOGUE_KINDS)]
            d = dlg.image_dialogue(scene, kind, rng, f"{split}_img_{i:05d}")
            records.append(_dialogue_record(d, spoken=i < n_spoken[split]))
        formats.write_llava(cfg.world_dir / f"dialogues_{split}.json", records)
        chats = []
        for i in range(n_chat[split]):
            d = dlg.chitchat_dialogue(item_rng(cfg, "chitchat", split, i), f"{split}_chat_{i:05d}")
            chats.append(_dialogue_record(d, spoken=True))
        formats.write_llava(cfg.world_dir / f"chitchat_{split}.json", chats)
        counts[split] = {
            "images": len(sc),
            **{f"{t}_samples": len(v) for t, v in per_task.items()},
            "image_dialogues": len(records),
            "spoken_image_dialogues": sum(r["spoken"] for r in records),
            "chitchat_dialogues": len(chats),
        }
    return stage.finish(seconds=round(time.time() - t0, 2), counts=counts)


def _dialogue_record(d: dlg.Dialogue, spoken: bool) -> dict:
    return {
        "id": d.id,
        "image": f"{d.image_id}.png" if d.image_id else None,
        "image_id": d.image_id,
        "kind": d.kind,
        "topic": d.topic,
        "turns": [(t.speaker, t.text) for t in d.turns],
        "refs": [list(t.refs) for t in d.turns],
        "qa": d.qa,
        "spoken": spoken,
    }


def world_paths(cfg: LabConfig, split: str) -> dict[str, Path]:
    """The real-format files the world wrote for one split."""
    r = cfg.world_dir
    return {
        "captions": r / f"captions_{split}.json",
        "vqa": r / f"vqa_{split}",
        "ocr": r / f"ocr_{split}",
        "count": r / f"count_{split}",
        "dialogues": r / f"dialogues_{split}.json",
        "chitchat": r / f"chitchat_{split}.json",
        "spoken": r / "spoken" / f"{split}.jsonl",
        "images": r / "images",
    }
