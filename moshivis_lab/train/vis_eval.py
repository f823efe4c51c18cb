"""Evaluate a trained MoshiVis on held-out images: tasks by text and by speech, speech kept, gates.

(a) **Tasks** on the test images (and the ``heldout`` split of unseen colour-shape pairs): VQA per
    question type, OCR and counting, each beside its chance level. With **text prompts** the
    question sits in the text stream (speechless mode) and the reply is decoded greedily; with
    **spoken prompts** (the paper's "Babillage" idea) the question is spoken by the TTS in user
    voices held out from training, encoded by the codec and streamed into the model frame by
    frame; the assistant's text stream after the question is the reply. A reply is right when its
    first sentence says the answer (yes/no questions: its first word).
(b) **Captions**: attribute F1 (colours, shapes, sizes, positions named) of the greedy caption.
(c) **Speech kept**: assistant audio NLL on held-out chit-chat recordings for the base LM, and
    for the adapted model with no image and with an unrelated image.
(d) **Gates as an image-relevance score**: on validation samples with unrelated chit-chat glued
    on, the AUROC of the gate (mean over the last 10 layers, as the paper) for "this is about the
    image", per assistant position, per assistant turn and (as before) over all positions.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moshivis_lab.artefacts import write_json
from moshivis_lab.config import TEXT_EPAD_ID, TEXT_PAD_ID, ZERO_TOKEN, LabConfig
from moshivis_lab.train.speech_eval import _finite, answer_found, words_of
from moshivis_lab.world import vocab

N_ROWS = 17
_SENTENCE = re.compile(r"[.?!]")
EVAL_TASKS = ("vqa", "ocr", "count")


def task_items(cfg: LabConfig, split: str, per_type: int | None = None) -> list[dict[str, Any]]:
    """Held-out VQA / OCR / counting / caption items: image, question, answer, type."""
    from moshivis_lab.world.shards import read_image_texts

    out: list[dict[str, Any]] = []
    counts: Counter[str] = Counter()
    for it in read_image_texts(cfg, split):
        if it.task not in (*EVAL_TASKS, "caption"):
            continue
        kind = "caption" if it.task == "caption" else f"{it.task}/{it.meta.get('answer_type')}"
        if per_type is not None and counts[kind] >= per_type:
            continue
        counts[kind] += 1
        (_, q), (_, a) = it.turns[0], it.turns[1]
        out.append(
            {"image_id": it.image_id, "task": it.task, "type": kind, "question": q, "answer": a}
        )
    return out


def reply_correct(reply: str, answer: str, kind: str) -> bool:
    """First word for yes/no, else the answer's words inside the reply's first sentence."""
    first = _SENTENCE.split(reply.strip(), maxsplit=1)[0] if reply.strip() else ""
    if kind.endswith("yes/no"):
        w = words_of(first)
        return bool(w) and w[0] == answer.lower()
    return answer_found(first, [answer])


def chance_levels(cfg: LabConfig) -> dict[str, dict[str, float]]:
    """Per question type: uniform chance over the train answers and the majority-answer rate."""
    answers: dict[str, Counter[str]] = defaultdict(Counter)
    for it in task_items(cfg, "train"):
        if it["task"] != "caption":
            answers[it["type"]][it["answer"].lower()] += 1
    return {
        k: {"uniform": 1.0 / len(c), "majority": max(c.values()) / sum(c.values())}
        for k, c in answers.items()
    }


REFERENT_ATTRIBUTES = ("colour", "shape", "size", "position")


def referent_blind(cfg: LabConfig, items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per question type, the expected accuracy on ``items`` of an answerer that sees the
    image's objects but not which one is asked: colour / shape / size / position questions get
    the scene's most common value (ties share the credit); other types (yes/no, counts, OCR)
    the train split's majority answer, which needs no image. A model that binds the question to
    its object beats this; one that only reads the scene's gist does not."""
    from moshivis_lab.world.generate import load_scenes

    scenes = {sc.id: sc for split in load_scenes(cfg).values() for sc in split}
    prior: dict[str, Counter[str]] = defaultdict(Counter)
    for it in task_items(cfg, "train"):
        if it["task"] != "caption":
            prior[it["type"]][it["answer"].lower()] += 1
    per: dict[str, list[float]] = defaultdict(list)
    how: dict[str, str] = {}
    for it in items:
        kind = it["type"]
        attr = kind.split("/", 1)[-1]
        if it["task"] == "vqa" and attr in REFERENT_ATTRIBUTES:
            values = Counter(getattr(o, attr) for o in scenes[it["image_id"]].objects)
            top = max(values.values())
            best = [v for v, c in values.items() if c == top]
            per[kind].append(float(it["answer"] in best) / len(best))
            how[kind] = "the scene's most common value"
        elif prior.get(kind):
            per[kind].append(float(prior[kind].most_common(1)[0][0] == it["answer"].lower()))
            how[kind] = "the train majority answer"
    out = {k: {"n": len(v), "accuracy": float(np.mean(v)), "rule": how[k]} for k, v in per.items()}
    vqa = [x for k, v in per.items() if k.startswith("vqa/") for x in v]
    if vqa:
        out["vqa_all"] = {"n": len(vqa), "accuracy": float(np.mean(vqa)), "rule": "per type"}
    return out


# ---------------------------------------------------------------------- text prompts


def _decode(tokenizer: Any, ids: list[int]) -> str:
    ids = [i for i in ids if i >= 0 and i not in (TEXT_PAD_ID, TEXT_EPAD_ID)]
    return tokenizer.decode(ids).strip() if ids else ""


@torch.inference_mode()
def text_replies(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    image_tokens: torch.Tensor | None,
    max_new_tokens: int = 10,
    batch_size: int = 64,
) -> list[str]:
    """Greedy speechless replies: each prompt in the text stream (audio rows -1,
    ``mix.prompt_tokens``), the reply decoded up to the mark that closes the assistant's turn.

    ``image_tokens [len(prompts), N, D]``: each prompt's image (None: the base model, no image).
    Prompts of equal token length share a batch so nothing is padded; each batch's image K/V
    are computed once and reused for every decoded token.
    """
    empty = [i for i, p in enumerate(prompts) if not str(p).strip()]
    if empty:
        raise ValueError(
            f"prompts {empty[:8]} are empty: there is no question to answer; drop them or write one"
        )
    if image_tokens is not None and len(image_tokens) != len(prompts):
        raise ValueError(
            f"{len(prompts)} prompts but {len(image_tokens)} images: give one image per prompt"
        )
    from moshivis_lab.train.mix import TURN_MARK, prompt_tokens

    enc = [prompt_tokens(tokenizer, p) for p in prompts]
    replies = [""] * len(prompts)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(enc):
        by_len[len(e)].append(i)
    device = model.device
    for _, idx_all in sorted(by_len.items()):
        for s in range(0, len(idx_all), batch_size):
            idx = idx_all[s : s + batch_size]
            codes = torch.full((len(idx), N_ROWS, len(enc[idx[0]])), ZERO_TOKEN, dtype=torch.long)
            codes[:, 0] = torch.tensor([enc[i] for i in idx])
            codes = codes.to(device)
            kv = (
                model.encode_image(image_tokens[idx].to(device))
                if image_tokens is not None
                else None
            )
            new: list[list[int]] = [[] for _ in idx]
            for _ in range(max_new_tokens):
                ext = torch.full((len(idx), N_ROWS, 1), ZERO_TOKEN, dtype=torch.long, device=device)
                out = model(torch.cat([codes, ext], 2), image_kv=kv)
                nxt = out.text_logits[:, 0, -1].float().argmax(-1)
                ext[:, 0, 0] = nxt
                codes = torch.cat([codes, ext], 2)
                for b, t in enumerate(nxt.tolist()):
                    new[b].append(t)
            for b, i in enumerate(idx):  # the reply ends at the mark that closes the turn
                end = new[b].index(TURN_MARK) if TURN_MARK in new[b] else len(new[b])
                replies[i] = _decode(tokenizer, new[b][:end])
    return replies


# ---------------------------------------------------------------------- spoken prompts


def spoken_prompts(
    cfg: LabConfig,
    questions: list[str],
    codec: Any,
    voices: list[Any],
    lead_in_s: float = 0.4,
    tail_s: float = 3.2,
) -> tuple[np.ndarray, list[int]]:
    """User codes ``[B, K, T]`` of each question spoken by ``voices[i % len]`` then silence,
    and each question's end frame."""
    from moshivis_lab.world.speech import synthesize

    sr, fs = int(codec.sample_rate), int(codec.frame_size)
    wavs, ends = [], []
    for i, q in enumerate(questions):
        u = synthesize(q, voices[i % len(voices)], sr)
        lead = np.zeros(int(lead_in_s * sr), np.float32)
        wavs.append(np.concatenate([lead, u.wav.astype(np.float32)]))
        ends.append(math.ceil(len(wavs[-1]) / fs))
    total = (max(ends) + math.ceil(tail_s * sr / fs)) * fs
    codes = [codec.encode(np.pad(w, (0, total - len(w)))) for w in wavs]
    return np.stack([np.asarray(c, np.int64) for c in codes]), ends


@torch.inference_mode()
def stream_replies(
    model: Any,
    user: np.ndarray,
    image_kv: Any,
    *,
    text_temperature: float = 0.0,
    temperature: float = 0.8,
    seed: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Full-duplex streaming over user codes ``[B, K, H]``: Moshi's text ``[B, H]`` and audio
    ``[B, dep_q, H]`` aligned to the user's frames (-1 during the delays)."""
    lm_cfg = model.lm.cfg if hasattr(model, "lm") else model.cfg
    b, _, h = user.shape
    text = np.full((b, h), ZERO_TOKEN, np.int64)
    audio = np.full((b, lm_cfg.dep_q, h), ZERO_TOKEN, np.int64)
    model.eval()
    with model.streaming(b, temperature=temperature, text_temperature=text_temperature, seed=seed):
        for j in tqdm(range(h + lm_cfg.max_delay), disable=not progress, desc="stream"):
            frame = j - 1
            u = user[:, :, frame] if 0 <= frame < h else np.full(user.shape[:2], ZERO_TOKEN)
            u = torch.from_numpy(np.ascontiguousarray(u)).to(model.device)
            tok, codes = model.step(u, image_kv) if image_kv is not None else model.step(u)
            t = j - lm_cfg.max_delay
            if 0 <= t < h:
                text[:, t] = tok.cpu().numpy()
                audio[:, :, t] = codes.cpu().numpy()
    return text, audio


# ---------------------------------------------------------------------- the report


def _accuracy(items: list[dict[str, Any]], replies: list[str]) -> dict[str, Any]:
    per: dict[str, list[bool]] = defaultdict(list)
    for it, r in zip(items, replies, strict=True):
        per[it["type"]].append(reply_correct(r, it["answer"], it["type"]))
    out: dict[str, Any] = {
        k: {"n": len(v), "accuracy": float(np.mean(v))} for k, v in sorted(per.items())
    }
    vqa = [o for k, v in per.items() if k.startswith("vqa/") for o in v]
    out["vqa_all"] = {"n": len(vqa), "accuracy": float(np.mean(vqa)) if vqa else float("nan")}
    return out


def _attributes(text: str) -> set[str]:
    words = set(words_of(text))
    names = (*vocab.COLOUR_NAMES, *vocab.SHAPES, *vocab.SIZE_NAMES)
    return {w for w in names if w in words}


def caption_f1(refs: list[str], hyps: list[str]) -> float:
    """Mean per-caption F1 between the colour / shape / size words named."""
    f1s = []
    for r, h in zip(refs, hyps, strict=True):
        a, b = _attributes(r), _attributes(h)
        if not a and not b:
            continue
        tp = len(a & b)
        f1s.append(2 * tp / (len(a) + len(b)) if (a or b) else 0.0)
    return float(np.mean(f1s)) if f1s else float("nan")


@torch.inference_mode()
def audio_nll(
    model: Any, grids: list[np.ndarray], image_tokens: torch.Tensor | None = None
) -> float:
    """Mean assistant-audio CE (nats, semantic book included unweighted) over ``grids``."""
    total, count = 0.0, 0
    for i, g in enumerate(grids):
        codes = torch.from_numpy(np.asarray(g, np.int64))[None].to(model.device)
        if image_tokens is not None:
            out = model(codes, image_tokens=image_tokens[i : i + 1].to(model.device))
        else:
            out = model(codes)
        m = out.mask[0]
        tgt = codes[0, 1 : 1 + m.shape[0]][m]
        ce = F.cross_entropy(out.logits[0][m].float(), tgt, reduction="sum")
        total, count = total + float(ce), count + int(m.sum())
    return total / max(count, 1)


GATE_VIEWS = ("all_positions", "assistant_positions", "assistant_turns")


def _auc_of(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """AUROC (NaN with one class only), count and the mean score per class."""
    from sklearn.metrics import roc_auc_score

    ok = len(set(labels.tolist())) == 2
    return {
        "n": int(len(labels)),
        "auroc": float(roc_auc_score(labels, scores)) if ok else float("nan"),
        "mean_gate_image": float(scores[labels == 1].mean())
        if (labels == 1).any()
        else float("nan"),
        "mean_gate_unrelated": float(scores[labels == 0].mean())
        if (labels == 0).any()
        else float("nan"),
    }


def assistant_turns(assistant: np.ndarray, relevance: np.ndarray) -> list[tuple[int, int, int]]:
    """The assistant's turns of one sample as ``(start, end, relevance)``: maximal runs of
    assistant positions with one defined relevance."""
    out = []
    k, n = 0, len(assistant)
    while k < n:
        if not assistant[k] or relevance[k] < 0:
            k += 1
            continue
        j = k
        while j < n and assistant[j] and relevance[j] == relevance[k]:
            j += 1
        out.append((k, j, int(relevance[k])))
        k = j
    return out


def gate_views(
    scores: np.ndarray, relevance: np.ndarray, assistant: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One sample's gate scores and labels in the three views of ``gate_auroc``."""
    ok = relevance >= 0
    a = ok & assistant
    turns = assistant_turns(assistant, relevance)
    return {
        "all_positions": (scores[ok], relevance[ok]),
        "assistant_positions": (scores[a], relevance[a]),
        "assistant_turns": (
            np.asarray([scores[s:e].mean() for s, e, _ in turns], np.float64),
            np.asarray([r for *_, r in turns], np.int64),
        ),
    }


@torch.inference_mode()
def gate_auroc(
    model: Any, data: Any, table: torch.Tensor, n_batches: int, batch_size: int, seed: int
) -> dict[str, Any]:
    """AUROC of the gate score (mean over the last 10 layers) for "this is about the image" on
    glued validation samples, in three views, for speech and speechless samples apart and pooled:

    - ``assistant_positions``: the positions where the assistant speaks, i.e. where the loss
      trains the gate (the user's tokens of speechless samples have loss weight 0);
    - ``assistant_turns``: the mean gate of each assistant turn against the turn's topic;
    - ``all_positions``: every labelled position (user turns, pads, marks included), the
      earlier measure. Top-level ``auroc`` is this one (kept for old reports' readers).
    """
    from moshivis_lab.train.mix import batch_for_step

    kinds = ("speech", "speechless")
    acc: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = {
        k: {v: [] for v in GATE_VIEWS} for k in kinds
    }
    last = min(10, len(model.cfg.layers))
    for i in range(n_batches):
        b = batch_for_step(data, batch_size, seed, i).to(model.device)
        out = model(b.codes, image_tokens=table[b.image_index.cpu()].to(model.device))
        g = out.gate_score(last).float().cpu().numpy()
        rel = b.relevance.cpu().numpy()
        asst = b.assistant.cpu().numpy()
        for r in range(g.shape[0]):
            kind = "speech" if bool(b.is_speech[r]) else "speechless"
            for view, pair in gate_views(g[r], rel[r], asst[r]).items():
                acc[kind][view].append(pair)

    def pooled(pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any] | None:
        if not pairs:
            return None
        return _auc_of(np.concatenate([p[1] for p in pairs]), np.concatenate([p[0] for p in pairs]))

    out_d: dict[str, Any] = {"last_layers": last, "views": list(GATE_VIEWS)}
    for kind in kinds:
        if not acc[kind]["all_positions"]:
            continue
        views = {v: pooled(acc[kind][v]) for v in GATE_VIEWS}
        allp = views["all_positions"] or {}
        out_d[kind] = {
            "positions": allp.get("n", 0),
            "auroc": allp.get("auroc", float("nan")),
            "mean_gate_image": allp.get("mean_gate_image", float("nan")),
            "mean_gate_unrelated": allp.get("mean_gate_unrelated", float("nan")),
            **{v: views[v] for v in GATE_VIEWS[1:]},
        }
    for view in GATE_VIEWS:
        out_d[view] = pooled([p for k in kinds for p in acc[k][view]])
    out_d["auroc"] = (out_d["all_positions"] or {}).get("auroc", float("nan"))
    return out_d


def run_image_tokens(cfg: LabConfig, run: str) -> str:
    """Where run ``run``'s image tokens came from (``TrainConfig.image_tokens``; "encoder" when
    the run has no report yet)."""
    from moshivis_lab.artefacts import read_json
    from moshivis_lab.train.adapters import adapters_dir

    report = adapters_dir(cfg, run) / "train_report.json"
    if not report.exists():
        return "encoder"
    return str(read_json(report).get("config", {}).get("image_tokens", "encoder"))


def evaluate_moshivis(
    cfg: LabConfig,
    model: Any,
    *,
    run: str = "main",
    splits: tuple[str, ...] = ("test", "heldout"),
    per_type: int = 60,
    spoken_per_type: int = 24,
    n_captions: int = 60,
    n_speech: int = 24,
    gate_batches: int = 8,
    seed: int = 0,
    base_lm: Any = None,
    out_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The full report of section (a)-(d) above; written to ``adapters/<run>/eval.json``."""
    from moshivis_lab.audio.codecs import load_codec
    from moshivis_lab.train.adapters import adapters_dir
    from moshivis_lab.train.image_tokens import split_tokens
    from moshivis_lab.train.mix import MixConfig, MixedData
    from moshivis_lab.train.pretrain import load_speech_lm
    from moshivis_lab.vision.pretrain import load_vision_encoder
    from moshivis_lab.world.shards import load_split
    from moshivis_lab.world.speech import user_voices
    from moshivis_lab.world.tokenizer import TextTokenizer

    t0 = time.time()
    model.eval()
    tok = TextTokenizer.load(cfg.tokenizer_path)
    codec = load_codec(cfg)
    encoder = load_vision_encoder(cfg)
    heldout_voices = list(
        user_voices(cfg.world.n_user_voices)[cfg.world.n_user_voices - cfg.world.n_heldout_voices :]
    )
    report: dict[str, Any] = {"run": run, "preset": cfg.name, "chance": chance_levels(cfg)}
    report["heldout_voices"] = [v.name for v in heldout_voices]

    source = run_image_tokens(cfg, run)  # the tokens the run was trained on
    report["image_tokens"] = source

    def tokens_for(ids: list[str], name: str) -> torch.Tensor:
        uniq = sorted(set(ids))
        table = split_tokens(cfg, uniq, encoder, name, progress, source)
        row = {k: i for i, k in enumerate(uniq)}
        return table[[row[i] for i in ids]]

    for split in splits:
        items = task_items(cfg, split, per_type)
        qa = [it for it in items if it["task"] != "caption"]
        caps = [it for it in items if it["task"] == "caption"][:n_captions]
        if not qa:
            continue
        res: dict[str, Any] = {}
        img = tokens_for([it["image_id"] for it in qa], f"eval_{split}")
        replies = text_replies(model, tok, [it["question"] for it in qa], img)
        res["text_prompts"] = _accuracy(qa, replies)
        res["referent_blind"] = referent_blind(cfg, qa)
        res["text_examples"] = [
            {"question": it["question"], "answer": it["answer"], "reply": r}
            for it, r in list(zip(qa, replies, strict=True))[:: max(1, len(qa) // 8)]
        ]
        # Spoken prompts, held-out voices.
        sp: list[dict[str, Any]] = []
        per: Counter[str] = Counter()
        for it in qa:
            if per[it["type"]] < spoken_per_type:
                per[it["type"]] += 1
                sp.append(it)
        user, ends = spoken_prompts(cfg, [it["question"] for it in sp], codec, heldout_voices)
        kv = model.encode_image(
            tokens_for([it["image_id"] for it in sp], f"eval_{split}").to(model.device)
        )
        text, _ = stream_replies(model, user, kv, seed=seed, progress=progress)
        sreplies = [_decode(tok, [int(x) for x in text[b, ends[b] :]]) for b in range(len(sp))]
        res["spoken_prompts"] = _accuracy(sp, sreplies)
        res["spoken_examples"] = [
            {"question": it["question"], "answer": it["answer"], "reply": r}
            for it, r in list(zip(sp, sreplies, strict=True))[:: max(1, len(sp) // 8)]
        ]
        if caps:
            img = tokens_for([it["image_id"] for it in caps], f"eval_{split}")
            hyp = text_replies(model, tok, [it["question"] for it in caps], img, max_new_tokens=40)
            res["caption_attribute_f1"] = caption_f1([it["answer"] for it in caps], hyp)
            res["caption_examples"] = [
                {"reference": it["answer"], "generated": h}
                for it, h in list(zip(caps, hyp, strict=True))[:4]
            ]
        report[split] = res

    # (c) Speech kept: chit-chat recordings of the test split.
    speech = load_split(cfg, "test")["speech"]
    grids = [
        np.asarray(speech.tokens(i), np.int64)[:, :256]
        for i, m in enumerate(speech.meta)
        if not m.get("image_id")
    ][:n_speech]
    if grids:
        base = base_lm if base_lm is not None else load_speech_lm(cfg)
        base.eval()
        # Chit-chat is unrelated to any image: show each recording some test image.
        ids = sorted({it["image_id"] for it in task_items(cfg, "test", 4)})
        unrelated = tokens_for([ids[i % len(ids)] for i in range(len(grids))], "eval_test")
        report["speech_kept"] = {
            "n": len(grids),
            "base_audio_nll": audio_nll(base, grids),
            "adapted_no_image_audio_nll": audio_nll(model, grids),
            "adapted_unrelated_image_audio_nll": audio_nll(model, grids, unrelated),
        }
    # (d) Gates.
    val = MixedData(cfg, "val", MixConfig(p_audio=0.5, p_concat=1.0))
    table = split_tokens(cfg, val.image_ids, encoder, "val", progress, source)
    report["gates"] = gate_auroc(model, val, table, gate_batches, 16, seed)
    report["seconds"] = round(time.time() - t0, 2)
    path = Path(out_path) if out_path is not None else adapters_dir(cfg, run) / "eval.json"
    write_json(path, _finite(report))
    return report
