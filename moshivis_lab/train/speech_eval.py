"""Measure a pretrained speech LM on held-out spoken dialogues.

(a) Teacher-forced NLL of the text stream and of each of Moshi's audio codebooks, next to a unigram
baseline (each row's token distribution on the train split, add-one smoothed) scored on exactly the
same held-out positions. (b) Free-running full-duplex generation from held-out user speech: for
chit-chat dialogues the user's codes are fed frame by frame up to the end of the user's first
question and ``extra_frames`` more; what the model's text stream says after the question counts as
an answer when one of the question's reference answers appears in it as words. A shuffled control
scores each reply against another dialogue's answers (what chance word overlap gives). (c) The
generated assistant audio is decoded with the codec and its F0 median compared with the assistant
channel of the same held-out recordings.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moshivis_lab.artefacts import write_json
from moshivis_lab.config import TEXT_EPAD_ID, TEXT_PAD_ID, ZERO_TOKEN, LabConfig
from moshivis_lab.model.lm import MoshiLM
from moshivis_lab.world.shards import ShardReader, load_split

_WORD = re.compile(r"[a-z0-9']+")


def words_of(text: str) -> list[str]:
    """Lowercase words of ``text`` with punctuation stripped."""
    return _WORD.findall(text.lower())


def answer_found(said: str, answers: list[str]) -> bool:
    """Whether any answer (one or more words) appears as whole words in ``said``."""
    w = words_of(said)
    for a in answers:
        aw = words_of(a)
        n = len(aw)
        if n and any(w[i : i + n] == aw for i in range(len(w) - n + 1)):
            return True
    return False


def unigram_logprobs(reader: ShardReader, rows: int, cards: list[int]) -> list[np.ndarray]:
    """Add-one smoothed log-unigram of each of the first ``rows`` grid rows over a speech shard."""
    counts = [np.ones(c, dtype=np.float64) for c in cards[:rows]]
    for i in range(len(reader)):
        g = np.asarray(reader.tokens(i), dtype=np.int64)
        for r in range(rows):
            x = g[r][g[r] != ZERO_TOKEN]
            counts[r] += np.bincount(x, minlength=cards[r])[: cards[r]]
    return [np.log(c / c.sum()) for c in counts]


def _pad_stack(grids: list[np.ndarray]) -> torch.Tensor:
    t = max(g.shape[1] for g in grids)
    out = np.full((len(grids), grids[0].shape[0], t), ZERO_TOKEN, dtype=np.int64)
    for i, g in enumerate(grids):
        out[i, :, : g.shape[1]] = g
    return torch.from_numpy(out)


@torch.no_grad()
def nll_report(
    model: MoshiLM,
    held: ShardReader,
    unigram: list[np.ndarray],
    n: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Model NLL (nats/token) of text and each Moshi codebook vs the unigram, same positions."""
    cfg = model.cfg
    q = cfg.dep_q
    idx = list(range(len(held) if n is None else min(n, len(held))))
    if not idx:
        raise ValueError("no held-out speech samples to score")
    sums = np.zeros((2, 2 + q))  # [model, unigram] x [text, text_words, books...]
    counts = np.zeros(2 + q)
    model.eval()
    for s in range(0, len(idx), batch_size):
        grids = [
            np.asarray(held.tokens(i), dtype=np.int64)[:, : cfg.context]
            for i in idx[s : s + batch_size]
        ]
        codes = _pad_stack(grids)
        out = model(codes)
        mask = out.text_mask[:, 0]
        tgt = codes[:, 0][mask]
        ce = F.cross_entropy(out.text_logits[:, 0][mask].float(), tgt, reduction="none").numpy()
        uni = -unigram[0][tgt.numpy()]
        words = ((tgt != TEXT_PAD_ID) & (tgt != TEXT_EPAD_ID)).numpy()
        sums[:, 0] += ce.sum(), uni.sum()
        counts[0] += ce.size
        sums[:, 1] += ce[words].sum(), uni[words].sum()
        counts[1] += words.sum()
        for k in range(q):
            m = out.mask[:, k]
            tk = codes[:, 1 + k][m]
            ce = F.cross_entropy(out.logits[:, k][m].float(), tk, reduction="none").numpy()
            sums[:, 2 + k] += ce.sum(), (-unigram[1 + k][tk.numpy()]).sum()
            counts[2 + k] += ce.size
    mean = sums / np.maximum(counts, 1)
    books, ubooks = mean[0, 2:].tolist(), mean[1, 2:].tolist()
    return {
        "samples": len(idx),
        "text_positions": int(counts[0]),
        "text_nll": float(mean[0, 0]),
        "text_unigram_nll": float(mean[1, 0]),
        "text_word_positions": int(counts[1]),
        "text_nll_words": float(mean[0, 1]),
        "text_unigram_nll_words": float(mean[1, 1]),
        "audio_nll_per_codebook": books,
        "audio_unigram_nll_per_codebook": ubooks,
        "audio_nll_mean": float(np.mean(books)),
        "audio_unigram_nll_mean": float(np.mean(ubooks)),
    }


def question_dialogues(held: ShardReader, n: int) -> list[dict[str, Any]]:
    """Up to ``n`` chit-chat dialogues with a user question: index, question, answers, end frame."""
    out = []
    for i, m in enumerate(held.meta):
        if m.get("kind") != "CHAT":
            continue
        qas = [q for q in (m.get("qa") or []) if q.get("asker") == "user"]
        if not qas:
            continue
        user_turns = [t for t in m.get("turns", []) if t.get("speaker") == "user"]
        for qa in qas:
            turn = next(
                (t for t in user_turns if words_of(t["text"]) == words_of(qa["question"])), None
            )
            if turn is not None:
                break
        else:
            continue
        out.append(
            {
                "index": i,
                "id": m.get("id"),
                "question": qa["question"],
                "answers": list(qa["answers"]),
                "question_end": int(turn["end_frame"]),
                "wav": m.get("wav"),
                "topic": qa.get("topic", m.get("topic")),
                "voice": m.get("user_voice"),
            }
        )
        if len(out) >= n:
            break
    return out


@torch.inference_mode()
def generate_replies(
    model: MoshiLM,
    held: ShardReader,
    items: list[dict[str, Any]],
    extra_frames: int,
    *,
    temperature: float = 0.8,
    top_k: int = 250,
    text_temperature: float = 0.7,
    text_top_k: int = 25,
    seed: int = 0,
    progress: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batched full-duplex streaming: ``(text [H], audio [dep_q, H])`` of Moshi for each item.

    Item ``b`` hears the user's held-out codes (grid rows after Moshi's) for frames
    ``0 .. H_b - 1`` with ``H_b = question_end + extra_frames`` (-1 past the recording's end).
    """
    cfg = model.cfg
    first_user = 1 + cfg.dep_q
    horizons = [it["question_end"] + extra_frames for it in items]
    h_max = max(horizons)
    user = np.full((len(items), model.n_user, h_max), ZERO_TOKEN, dtype=np.int64)
    for b, it in enumerate(items):
        g = np.asarray(held.tokens(it["index"]), dtype=np.int64)
        t = min(horizons[b], g.shape[1])
        user[b, :, :t] = g[first_user : first_user + model.n_user, :t]
    text = np.full((len(items), h_max), ZERO_TOKEN, dtype=np.int64)
    audio = np.full((len(items), cfg.dep_q, h_max), ZERO_TOKEN, dtype=np.int64)
    model.eval()
    with model.streaming(
        len(items),
        temperature=temperature,
        top_k=top_k,
        text_temperature=text_temperature,
        text_top_k=text_top_k,
        seed=seed,
    ):
        for j in tqdm(range(h_max + cfg.max_delay), disable=not progress, desc="generate"):
            frame = j - 1  # the user frame heard at call j
            u = user[:, :, frame] if 0 <= frame < h_max else np.full(user.shape[:2], ZERO_TOKEN)
            tok, codes = model.step(torch.from_numpy(np.ascontiguousarray(u)))
            t = j - cfg.max_delay
            if 0 <= t < h_max:
                text[:, t] = tok.numpy()
                audio[:, :, t] = codes.numpy()
    return [(text[b, : horizons[b]], audio[b, :, : horizons[b]]) for b in range(len(items))]


def _f0_median(wav: np.ndarray, sample_rate: int) -> float:
    from moshivis_lab.audio.prosody import prosody_features

    if wav.size == 0:
        return float("nan")
    return float(prosody_features(wav, sample_rate).summary.get("f0_median", float("nan")))


def _assistant_channel(cfg: LabConfig, split: str, wav_name: str, sample_rate: int) -> np.ndarray:
    from moshivis_lab.world import formats
    from moshivis_lab.world.generate import world_paths

    index = world_paths(cfg, split)["spoken"]
    path = index.parent / split / wav_name
    if not path.exists():
        path = next(
            (r.wav_path for r in formats.read_spoken_index(index) if r.wav_path.name == wav_name),
            path,
        )
    rec = formats.SpokenRecord(Path(path), 0.0, {})
    return rec.load(sample_rate)[0]


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else float("nan")


def evaluate_speech_lm(
    cfg: LabConfig,
    model: MoshiLM,
    *,
    split: str = "val",
    n_dialogues: int = 150,
    n_nll: int | None = None,
    n_f0: int = 10,
    extra_frames: int = 40,
    seed: int = 0,
    temperature: float = 0.8,
    text_temperature: float = 0.7,
    tokenizer: Any = None,
    codec: Any = None,
    out_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """NLL vs unigram, question-answer accuracy and F0 ratio on held-out dialogues; JSON report.

    ``n_nll`` limits the NLL to the first samples of the split (None = all); ``n_f0`` dialogues
    are decoded for F0; ``temperature`` / ``text_temperature`` (0 = greedy) drive generation. The report is written atomically to ``out_path`` (default
    ``speech_lm/eval_{split}.json``) and returned.
    """
    from moshivis_lab.train.pretrain import speech_lm_dir

    if split not in ("val", "test", "heldout"):
        raise ValueError(
            f"split must be a held-out split ('val', 'test', 'heldout'), got {split!r}"
        )
    for name, v in (("n_dialogues", n_dialogues), ("extra_frames", extra_frames)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if n_f0 < 0:
        raise ValueError(f"n_f0 must be >= 0, got {n_f0}")
    if tokenizer is None:
        from moshivis_lab.world.tokenizer import TextTokenizer

        tokenizer = TextTokenizer.load(cfg.tokenizer_path)
    if codec is None:
        from moshivis_lab.audio.codecs import load_codec

        codec = load_codec(cfg)
    t0 = time.time()
    mcfg = model.cfg
    held = load_split(cfg, split)["speech"]
    train = load_split(cfg, "train")["speech"]
    unigram = unigram_logprobs(train, 1 + mcfg.dep_q, [mcfg.text_card] + [mcfg.card] * mcfg.dep_q)
    report: dict[str, Any] = {"split": split, "preset": cfg.name}
    report["nll"] = nll_report(model, held, unigram, n_nll)

    items = question_dialogues(held, n_dialogues)
    qa: dict[str, Any] = {
        "n": len(items),
        "extra_frames": extra_frames,
        "temperature": temperature,
        "text_temperature": text_temperature,
        "seed": seed,
    }
    examples = []
    if items:
        gens = generate_replies(
            model,
            held,
            items,
            extra_frames,
            temperature=temperature,
            text_temperature=text_temperature,
            seed=seed,
            progress=progress,
        )
        said = []
        for it, (text, _) in zip(items, gens, strict=True):
            ids = [int(x) for x in text[it["question_end"] :]]
            ids = [x for x in ids if x not in (ZERO_TOKEN, TEXT_PAD_ID, TEXT_EPAD_ID) and x >= 0]
            said.append(tokenizer.decode(ids).strip() if ids else "")
        ok = [answer_found(s, it["answers"]) for s, it in zip(said, items, strict=True)]
        shuffled = [
            answer_found(said[b], items[(b + 1) % len(items)]["answers"])
            for b in range(len(items))
            if len(items) > 1
        ]
        qa["accuracy"] = float(np.mean(ok))
        qa.update(_breakdown(cfg, items, ok))
        qa["shuffled_control_accuracy"] = float(np.mean(shuffled)) if shuffled else float("nan")
        qa["mean_reply_words"] = float(np.mean([len(words_of(s)) for s in said]))
        examples = [
            {"id": it["id"], "question": it["question"], "answers": it["answers"], "said": s}
            for it, s in zip(items[:8], said[:8], strict=False)
        ]
        qa["examples"] = examples
        # (c) F0 of the generated assistant voice vs the recordings' assistant channel.
        sr = int(codec.sample_rate)
        fs = int(codec.frame_size)
        gen_wavs, ref_wavs, codec_wavs = [], [], []
        for it, (_, audio) in list(zip(items, gens, strict=True))[:n_f0]:
            valid = (audio >= 0).all(axis=0)
            gen_wavs.append(codec.decode(audio[:, valid]))
            g = np.asarray(held.tokens(it["index"]), dtype=np.int64)
            h = min(audio.shape[1], g.shape[1])
            codec_wavs.append(codec.decode(g[1 : 1 + mcfg.dep_q, :h]))
            ref_wavs.append(_assistant_channel(cfg, split, it["wav"], sr)[: h * fs])
        if gen_wavs:
            f0 = {
                "n": len(gen_wavs),
                "generated_f0_median": _f0_median(np.concatenate(gen_wavs), sr),
                "reference_f0_median": _f0_median(np.concatenate(ref_wavs), sr),
                "reference_codec_f0_median": _f0_median(np.concatenate(codec_wavs), sr),
            }
            f0["ratio"] = _ratio(f0["generated_f0_median"], f0["reference_f0_median"])
            f0["codec_roundtrip_ratio"] = _ratio(
                f0["reference_codec_f0_median"], f0["reference_f0_median"]
            )
            report["f0"] = f0
    report["qa"] = qa
    report["seconds"] = round(time.time() - t0, 2)
    path = Path(out_path) if out_path is not None else speech_lm_dir(cfg) / f"eval_{split}.json"
    write_json(path, _finite(report))
    return report


def _breakdown(cfg: LabConfig, items: list[dict[str, Any]], ok: list[bool]) -> dict[str, Any]:
    """Accuracy for user voices heard in training vs held-out voices, and per chit-chat topic."""
    from moshivis_lab.world.speech import user_voices

    voices = [v.name for v in user_voices(cfg.world.n_user_voices)]
    seen = set(voices[: len(voices) - cfg.world.n_heldout_voices])
    out: dict[str, Any] = {}
    for name, pick in (("seen_voices", True), ("heldout_voices", False)):
        sel = [o for it, o in zip(items, ok, strict=True) if (it.get("voice") in seen) == pick]
        out[f"{name}_n"] = len(sel)
        out[f"{name}_accuracy"] = float(np.mean(sel)) if sel else float("nan")
    topics: dict[str, list[bool]] = {}
    for it, o in zip(items, ok, strict=True):
        topics.setdefault(str(it.get("topic")), []).append(o)
    out["by_topic"] = {
        t: {"n": len(v), "accuracy": float(np.mean(v))} for t, v in sorted(topics.items())
    }
    return out


def _finite(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
