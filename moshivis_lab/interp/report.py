"""The headline numbers of the gate, cross-attention and attribution analyses, as one JSON.

``interp_report(cfg, run="main")`` loads a trained adapter run and measures:

- ``checks``: the eager attention path equals the fused one; gates forced to 0 give the base
  LM's logits;
- ``gates``: the image-relevance AUROC of the gate score (``vis_eval.gate_auroc``) and of each
  layer, the mean gate on image vs unrelated turns of glued dialogues, and what forcing the gates
  does to greedy text replies and to teacher-forced predictions;
- ``pointing_game``: hit rate per layer on single-object questions of the test split beside the
  random-peak baseline (box area share);
- ``attribution``: IG completeness gaps (image tokens, pixels, user audio), Spearman rank
  correlation of attributions and attention over patches, pointing game of attribution peaks.

Written to ``data/<preset>/interp/report.json`` (``report_<run>.json`` for other runs).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moshivis_lab.artefacts import write_json


def interp_dir(cfg: Any) -> Path:
    """Where the interpretability outputs of a preset live: ``data/<preset>/interp``."""
    return Path(cfg.data_dir) / cfg.name / "interp"


def _clean(x: Any) -> Any:
    """JSON-safe: numpy scalars to floats, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def interp_report(
    cfg: Any,
    run: str = "main",
    *,
    split: str = "test",
    auroc_batches: int = 8,
    pointing_per_type: int | None = None,
    attribution_items: int = 24,
    audio_items: int = 6,
    ig_steps: int = 64,
    pixel_steps: int = 256,
    dialogues: int = 8,
    intervention_prompts: int = 48,
    seed: int = 0,
    out_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure the headline numbers of trained run ``run`` and write them as JSON (returned).

    Sizes: ``auroc_batches`` of 16 glued val samples; every single-object test question for the
    pointing game (or ``pointing_per_type`` per question type); ``attribution_items`` questions
    for image IG and ``audio_items`` spoken dialogues for audio IG, ``ig_steps`` each
    (``pixel_steps`` through the vision tower);
    ``dialogues`` glued spoken + text dialogues for gate segments; ``intervention_prompts``
    questions for the gate interventions.
    """
    from moshivis_lab.interp import attention as A
    from moshivis_lab.interp import attribution as T
    from moshivis_lab.interp import gates as G
    from moshivis_lab.interp.cache import image_tokens_for
    from moshivis_lab.train.adapters import load_trained
    from moshivis_lab.vision.pretrain import load_vision_encoder
    from moshivis_lab.world.tokenizer import TextTokenizer

    t0 = time.time()
    torch.manual_seed(seed)
    model = load_trained(cfg, run)
    enc = load_vision_encoder(cfg, device=model.device)
    tok = TextTokenizer.load(cfg.tokenizer_path)
    rep: dict[str, Any] = {"preset": cfg.name, "run": run, "split": split, "seed": seed}

    # Checks.
    items = A.pointing_items(cfg, split, per_type=pointing_per_type)
    first = items[0]
    codes, _ = A.qa_codes(tok, first.question, first.answer)
    img = image_tokens_for(cfg, [first.image_id], enc)
    eager = A.check_eager(model, codes, img)
    with torch.no_grad():
        base = model(torch.from_numpy(codes)[None].to(model.device))
        with G.force_gates(model, 0.0):
            zero = model(torch.from_numpy(codes)[None].to(model.device), image_tokens=img)
    rep["checks"] = {
        "eager_max_abs_diff": max(eager.text, eager.audio, eager.gates, eager.hooked),
        "eager_ok": eager.ok,
        "gate0_equals_base": bool(torch.equal(base.text_logits, zero.text_logits)),
    }

    # Gates: relevance AUROC, segments of glued dialogues, interventions.
    auroc = G.relevance_auroc(
        model, cfg, n_batches=auroc_batches, seed=seed, encoder=enc, progress=progress
    )
    traces = []
    for k in range(dialogues):
        for build in (G.spoken_dialogue, G.text_dialogue):
            d = build(cfg, "val", k, chat=k, chat_first=k % 2 == 0)
            traces.append(G.gate_trace(model, d, image_tokens_for(cfg, [d.image_id], enc)))
    prof = G.switch_profile(traces, 8, 8)
    qa = [it for it in items][:intervention_prompts]
    ids = sorted({it.image_id for it in qa})
    table = image_tokens_for(cfg, ids, enc)
    row = {k: i for i, k in enumerate(ids)}
    q_img = table[[row[it.image_id] for it in qa]]
    inter = G.compare_text_replies(model, tok, [it.question for it in qa], q_img)
    shift_codes = np.stack([A.qa_codes(tok, it.question, it.answer)[0] for it in qa[:1]])
    shift = G.logit_shift(model, shift_codes, q_img[:1])
    rep["gates"] = {
        "relevance_auroc": auroc.to_json(),
        "segments_by_topic": G.segment_summary(traces, "topic"),
        "segments_by_speaker": G.segment_summary(traces, "speaker"),
        "switch_profile": {
            "offsets": prof.offsets.tolist(),
            "into_image": prof.into_image.tolist(),
            "out_of_image": prof.out_of_image.tolist(),
        },
        "interventions_text_replies": inter.summary(),
        "interventions_logit_shift_one_question": shift.summary(),
    }

    # Pointing game.
    pg = A.pointing_game(model, cfg, items, tokenizer=tok, encoder=enc, progress=progress)
    rep["pointing_game"] = pg.to_json()

    # Attributions.
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(items), size=min(attribution_items, len(items)), replace=False))
    study = T.attribution_study(
        model,
        cfg,
        [items[i] for i in pick],
        n_steps=ig_steps,
        pixel_steps=pixel_steps,
        tokenizer=tok,
        encoder=enc,
        progress=progress,
    )
    audio = []
    for k in range(audio_items):
        d = G.spoken_dialogue(cfg, split, k, chat=None)
        target, turn, prev = T.spoken_target(d)
        a = T.attribute_user_audio(
            model, target, image_tokens_for(cfg, [d.image_id], enc), n_steps=ig_steps
        )
        # Model step s reads user frame s - 1: the question's frames are steps start+1..end.
        in_q = T.mass_share(a.map, prev.start + 1, prev.end + 1) if prev else float("nan")
        share = (prev.end - prev.start) / (target.step + 1) if prev else float("nan")
        audio.append({"gap": a.gap, "mass_in_question": in_q, "question_share_of_steps": share})
    rep["attribution"] = study.to_json()
    rep["attribution"]["user_audio"] = {
        "n": len(audio),
        "completeness_gap_mean": float(np.mean([x["gap"] for x in audio])),
        "completeness_gap_median": float(np.median([x["gap"] for x in audio])),
        "mass_in_question_mean": float(np.mean([x["mass_in_question"] for x in audio])),
        "question_share_of_steps_mean": float(
            np.mean([x["question_share_of_steps"] for x in audio])
        ),
    }
    rep["ig_steps"] = ig_steps
    rep["pixel_steps"] = pixel_steps
    rep["seconds"] = round(time.time() - t0, 1)
    rep = _clean(rep)
    name = "report.json" if run == "main" else f"report_{run}.json"
    path = Path(out_path) if out_path is not None else interp_dir(cfg) / name
    write_json(path, rep)
    rep["path"] = str(path)
    return rep
