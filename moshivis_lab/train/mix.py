"""The single-stage data mix of MoshiVis: speech samples and speechless samples in one batch.

Each training sample is an aligned Moshi grid ``[17, T]`` (row 0 text, rows 1..8 the assistant's
codes, rows 9..16 the user's) that talks about one image, plus two per-position rows:

- ``text_weight [T]``: the weight of the text target at that position (speechless samples train
  on the assistant's tokens only unless ``MixConfig.user_text_weight`` says otherwise);
- ``relevance [T]``: 1 where the dialogue is about the image, 0 on glued unrelated talk, -1 where
  it is undefined (padding). It is never used by the loss: it is the ground truth of the gate
  image-relevance analysis.
- ``assistant [T]``: True where the assistant speaks (its turns' frames in speech samples, its
  tokens and turn marks in speechless ones): the positions where the loss trains the gate.

A **speech** sample (probability ``p_audio``) is a spoken image dialogue of the world, its text row
the assistant's timed inner monologue. A **speechless** sample is an image-text item (caption, VQA,
OCR, counting, or an image dialogue as text) whose whole dialogue sits in the text stream, user
and assistant tokens one after another, each assistant turn closed by ``TURN_MARK`` (EPAD;
``mark_turns``), while every audio row is the zero token (-1, embedded as exactly zero and
masked out of the loss). Without the mark a bare answer ran into the next question and the model
could not tell where its reply ends ("Is the cross blue?" -> "yess is."); with it, validation VQA
by text went from 33.9 % to 38.9 %. With probability ``p_concat`` an unrelated chit-chat
dialogue is glued before or after (as speech for speech samples, as text for speechless ones), so
that the model learns to switch topic and the gates can learn when the image matters.

Packing (``pack_items``, default 4): a speechless sample is its item followed by up to three
other items of the same image (say a caption, two questions and a count), as long as they fit in
``text_len``: one forward then trains several answers about the image, a multi-turn text dialogue.
Measured on the tiny world (800 steps, validation VQA with text prompts, 60 per type): one item
per sample 33 % with the right image and 32 % with a shuffled one, i.e. the adapters had not
learnt to look; with four, 40 % against 29 % (colour questions 5 % -> 43 %). With
``pack_items=8, text_len=160``: 41 %, for a 20 % slower step.

Every sample is a pure function of ``(seed, step, slot)`` so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moshivis_lab.config import TEXT_EPAD_ID, ZERO_TOKEN, LabConfig, _check, _check_types
from moshivis_lab.world.shards import ShardReader, load_split

N_ROWS = 17  # Moshi's grid: text + 8 assistant + 8 user codebooks (tiny and real alike)
TURN_MARK = TEXT_EPAD_ID  # closes each assistant turn of a speechless sample
# The layout of speechless samples; part of every adapter run's key, so runs trained on another
# layout are retrained rather than reused (1: turns unmarked; 2: a mark before and after each
# answer; 3: a mark after each answer).
SPEECHLESS_FORMAT = 3
SHORT_ANSWER_TASKS = ("vqa", "ocr", "count")  # image-text items whose reply is a short answer


def mark_turns(ids: np.ndarray, roles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Speechless text with its turns marked: ``TURN_MARK`` (EPAD) after every assistant turn,
    with the assistant's role (so it is trained: the model learns that its reply ends there).

    Without marks a bare answer ran into the next question ("Is the cross blue?" -> "yess is."):
    the model could not tell where its reply stops. Measured at the tiny preset (800 steps,
    validation VQA by text, 60 questions per type, tiny SigLIP / oracle tokens): unmarked 33.9 /
    46.1 %; a mark before and after each answer 31.9 / 46.1 % (the answer is then predicted at
    the mark, a token the frozen LM never met in running text); a mark after each answer only
    38.9 / 50.8 %. The answer is predicted right after the question, as in the LM's text
    pretraining, and ``prompt_tokens`` is the question alone.
    """
    ids, roles = np.asarray(ids, np.int64), np.asarray(roles, np.int64)
    out_i: list[int] = []
    out_r: list[int] = []
    for k, (t, r) in enumerate(zip(ids.tolist(), roles.tolist(), strict=True)):
        if k > 0 and r != roles[k - 1] and roles[k - 1] == 1:
            out_i.append(TURN_MARK)
            out_r.append(1)
        out_i.append(t)
        out_r.append(r)
    if len(roles) and roles[-1] == 1:
        out_i.append(TURN_MARK)
        out_r.append(1)
    return np.asarray(out_i, np.int64), np.asarray(out_r, np.int64)


def dialogue_tokens(tokenizer: Any, turns: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """A transcript (``[{"speaker", "text"}, ...]``) as marked speechless text: ids and roles."""
    ids: list[int] = []
    roles: list[int] = []
    for t in turns:
        tok = tokenizer.encode(t["text"])
        ids += tok
        roles += [1 if t["speaker"] == "assistant" else 0] * len(tok)
    return mark_turns(np.asarray(ids, np.int64), np.asarray(roles, np.int64))


def prompt_tokens(tokenizer: Any, question: str) -> list[int]:
    """A user's text prompt as a speechless model reads it: the question's tokens; the reply is
    what the model writes next, up to its ``TURN_MARK``."""
    return list(tokenizer.encode(question))


@dataclass(frozen=True)
class MixConfig:
    """How batches mix speech and speechless samples (validated on construction)."""

    p_audio: float = 0.25  # probability that a sample is a spoken image dialogue
    p_concat: float = 0.5  # probability of gluing an unrelated chit-chat dialogue to a sample
    speech_len: int = 160  # frames per speech sample (12.5 Hz: 160 = 12.8 s)
    text_len: int = 96  # tokens per speechless sample
    user_text_weight: float = 0.0  # loss weight of the user's tokens in speechless samples
    pack_items: int = 4  # image-text items of one image joined into a speechless sample
    answer_weight: float = 1.0  # loss weight of short answers (VQA, OCR, counting), speechless
    caption_weight: float = 1.0  # loss weight of caption tokens in speechless samples
    pack_answers_first: bool = False  # pack a sample's short-answer items before the others
    # probability that a speechless sample is a fresh QA session: short-answer items made anew
    # from a training image's scene graph (world.tasks.make_tasks), as many as fit
    p_qa_session: float = 0.0

    def __post_init__(self) -> None:
        _check_types(self)  # a value of the wrong kind fails here, the field named
        for n in ("p_audio", "p_concat", "p_qa_session"):
            v = getattr(self, n)
            _check(0.0 <= v <= 1.0, "MixConfig", n, f"must be a probability in [0, 1], got {v}")
        _check(
            self.pack_items >= 1,
            "MixConfig",
            "pack_items",
            f"must be >= 1 (1: one item per sample), got {self.pack_items}",
        )
        for n in ("speech_len", "text_len"):
            v = getattr(self, n)
            _check(v >= 8, "MixConfig", n, f"must be >= 8, got {v}")
        for n in ("user_text_weight", "answer_weight", "caption_weight"):
            v = getattr(self, n)
            _check(v >= 0 and v == v, "MixConfig", n, f"must be >= 0, got {v}")

    def replace(self, **changes: Any) -> MixConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def answer_dense(cls) -> MixConfig:
        """The tiny preset's mix: as many short answers per step as the budget allows. Speech
        samples 10 % (the p_audio sweep shows speech kept there), half the speechless samples
        fresh QA sessions from the scene graphs, up to eight items per sample within 128 tokens,
        short answers first, weighted 4x, captions 0.25x."""
        return cls(
            p_audio=0.1,
            text_len=128,
            pack_items=8,
            answer_weight=4.0,
            caption_weight=0.25,
            pack_answers_first=True,
            p_qa_session=0.5,
        )


@dataclass
class Batch:
    """A training batch: codes ``[B, 17, T]``, per-position rows ``[B, T]``, image indices."""

    codes: torch.Tensor
    text_weight: torch.Tensor
    relevance: torch.Tensor
    image_index: torch.Tensor  # row of the image-token table of the split
    is_speech: torch.Tensor  # bool [B]
    assistant: torch.Tensor  # bool [B, T]: the assistant's positions

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        return Batch(*(t.to(device) for t in dataclasses.astuple(self)))


class MixedData:
    """One split's samples, ready to be drawn into mixed batches.

    ``image_ids`` fixes the order of the split's image-token table (``Batch.image_index`` points
    into it). Chit-chat text for speechless gluing is tokenised once from the spoken chit-chat
    transcripts.
    """

    def __init__(self, cfg: LabConfig, split: str, mix: MixConfig, tokenizer: Any = None) -> None:
        if tokenizer is None:
            from moshivis_lab.world.tokenizer import TextTokenizer

            tokenizer = TextTokenizer.load(cfg.tokenizer_path)
        self.mix = mix
        self.tokenizer = tokenizer
        self.split = split
        self.last_ids: list[str] = []
        shards = load_split(cfg, split)
        self.speech: ShardReader = shards["speech"]
        self.text: ShardReader = shards["text"]
        self.image_ids: list[str] = sorted(
            {m["image_id"] for m in self.text.meta if m.get("image_id")}
            | {m["image_id"] for m in self.speech.meta if m.get("image_id")}
        )
        self.image_row = {k: i for i, k in enumerate(self.image_ids)}
        self.spoken_image = [i for i, m in enumerate(self.speech.meta) if m.get("image_id")]
        self.spoken_chat = [i for i, m in enumerate(self.speech.meta) if not m.get("image_id")]
        self.texts = [i for i, m in enumerate(self.text.meta) if m.get("image_id")]
        self.texts_of_image: dict[str, list[int]] = {}
        for i in self.texts:
            self.texts_of_image.setdefault(self.text.meta[i]["image_id"], []).append(i)
        self.chat_text: list[tuple[np.ndarray, np.ndarray]] = []
        for i in self.spoken_chat:
            self.chat_text.append(dialogue_tokens(tokenizer, self.speech.meta[i].get("turns", [])))
        if not self.texts:
            raise ValueError(f"split {split!r} has no image-text samples; rebuild the world data")
        self.scenes: dict[str, Any] = {}
        if mix.p_qa_session > 0:
            from moshivis_lab.world.generate import load_scenes

            self.scenes = {sc.id: sc for sc in load_scenes(cfg)[split] if sc.id in self.image_row}
            self.session_images = sorted(self.scenes)
        if mix.p_audio > 0 and not self.spoken_image:
            raise ValueError(
                f"p_audio={mix.p_audio} but split {split!r} has no spoken image dialogues; "
                "set p_audio=0 or build a world with n_spoken_image_dialogues > 0"
            )

    # ------------------------------------------------------------------ single samples

    def speech_sample(self, i: int, rng: np.random.Generator, glue: bool) -> dict[str, Any]:
        """Spoken image dialogue ``i`` of the speech shard (maybe with chit-chat glued on)."""
        meta = self.speech.meta[i]
        grid = np.asarray(self.speech.tokens(i), dtype=np.int64)
        rel = turn_relevance(meta, grid.shape[1])
        asst = turn_speaker(meta, grid.shape[1])
        if glue and self.spoken_chat:
            j = self.spoken_chat[int(rng.integers(len(self.spoken_chat)))]
            other = np.asarray(self.speech.tokens(j), dtype=np.int64)
            orel = np.zeros(other.shape[1], np.int64)
            oasst = turn_speaker(self.speech.meta[j], other.shape[1])
            if rng.random() < 0.5:
                grid, rel = np.concatenate([other, grid], 1), np.concatenate([orel, rel])
                asst = np.concatenate([oasst, asst])
            else:
                grid, rel = np.concatenate([grid, other], 1), np.concatenate([rel, orel])
                asst = np.concatenate([asst, oasst])
        n = self.mix.speech_len
        start = _crop_start(rel, grid.shape[1], n, rng)
        grid, rel = grid[:, start : start + n], rel[start : start + n]
        return {
            "codes": grid,
            "text_weight": (grid[0] != ZERO_TOKEN).astype(np.float32),
            "relevance": rel,
            "assistant": asst[start : start + n],
            "image": self.image_row[meta["image_id"]],
            "speech": True,
        }

    def text_sample(self, i: int, rng: np.random.Generator, glue: bool) -> dict[str, Any]:
        """Speechless image-text sample ``i`` of the text shard (maybe with chit-chat glued on)."""
        ids, roles, scale = self._item(i)
        if self.mix.pack_items > 1:
            ids, roles, scale = self._pack(i, ids, roles, scale, rng)
        return self._speechless(ids, roles, scale, self.text.meta[i]["image_id"], rng, glue)

    def qa_session(self, rng: np.random.Generator, glue: bool) -> tuple[dict[str, Any], str]:
        """A fresh speechless QA session about a random image of the split: its short-answer
        items (VQA, OCR, counting) made anew from the scene graph by ``world.tasks.make_tasks``,
        in a random order, as many as fit in ``text_len`` (at most ``pack_items``); and its id."""
        from moshivis_lab.world.tasks import make_tasks

        if not self.scenes:
            raise ValueError("qa_session needs MixConfig.p_qa_session > 0 (scenes not loaded)")
        image_id = self.session_images[int(rng.integers(len(self.session_images)))]
        items = [
            it for it in make_tasks(self.scenes[image_id], rng) if it.task in SHORT_ANSWER_TASKS
        ]
        parts_i, parts_r = [], []
        total = 0
        for k in rng.permutation(len(items)).tolist():
            if len(parts_i) >= self.mix.pack_items:
                break
            q, a = self.tokenizer.encode(items[k].question), self.tokenizer.encode(items[k].answer)
            ids, roles = mark_turns(
                np.asarray(q + a, np.int64), np.asarray([0] * len(q) + [1] * len(a), np.int64)
            )
            if total + len(ids) > self.mix.text_len:
                continue
            parts_i.append(ids)
            parts_r.append(roles)
            total += len(ids)
        ids, roles = np.concatenate(parts_i), np.concatenate(parts_r)
        scale = np.where((roles == 1) & (ids != TURN_MARK), self.mix.answer_weight, 1.0)
        sample = self._speechless(ids, roles, scale.astype(np.float32), image_id, rng, glue)
        return sample, f"qa_session:{image_id}"

    def _speechless(
        self,
        ids: np.ndarray,
        roles: np.ndarray,
        scale: np.ndarray,
        image_id: str,
        rng: np.random.Generator,
        glue: bool,
    ) -> dict[str, Any]:
        """Marked image text as a speechless sample (maybe with chit-chat glued on)."""
        rel = np.ones(len(ids), np.int64)
        if glue and self.chat_text:
            cids, croles = self.chat_text[int(rng.integers(len(self.chat_text)))]
            crel = np.zeros(len(cids), np.int64)
            cscale = np.ones(len(cids), np.float32)
            if rng.random() < 0.5:
                ids, roles, rel, scale = (
                    np.concatenate(x)
                    for x in ((cids, ids), (croles, roles), (crel, rel), (cscale, scale))
                )
            else:
                ids, roles, rel, scale = (
                    np.concatenate(x)
                    for x in ((ids, cids), (roles, croles), (rel, crel), (scale, cscale))
                )
        n = self.mix.text_len
        if len(ids) > n:  # keep the image part whole where possible
            img = np.flatnonzero(rel == 1)
            start = min(max(int(img[-1]) + 1 - n, 0), int(img[0])) if len(img) else 0
            ids, roles, rel, scale = (
                ids[start : start + n],
                roles[start : start + n],
                rel[start : start + n],
                scale[start : start + n],
            )
        codes = np.full((N_ROWS, len(ids)), ZERO_TOKEN, np.int64)
        codes[0] = ids
        w = np.where(roles == 1, scale, self.mix.user_text_weight).astype(np.float32)
        return {
            "codes": codes,
            "text_weight": w,
            "relevance": rel,
            "assistant": roles == 1,
            "image": self.image_row[image_id],
            "speech": False,
        }

    def _item(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row ``i`` of the text shard as marked speechless text: ids, roles and the loss scale
        of each assistant token (``answer_weight`` on a short answer's words, ``caption_weight``
        on a caption's, 1 elsewhere and on the turn marks)."""
        tok = np.asarray(self.text.tokens(i), dtype=np.int64)
        ids, roles = mark_turns(tok[0], tok[1])
        task = self.text.meta[i].get("task")
        factor = {"caption": self.mix.caption_weight}.get(task, 1.0)
        if task in SHORT_ANSWER_TASKS:
            factor = self.mix.answer_weight
        scale = np.where((roles == 1) & (ids != TURN_MARK), factor, 1.0).astype(np.float32)
        return ids, roles, scale

    def _pack(
        self,
        i: int,
        ids: np.ndarray,
        roles: np.ndarray,
        scale: np.ndarray,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Item ``i`` followed by up to ``pack_items - 1`` other items of the same image, in a
        random order (short answers first with ``pack_answers_first``), each added only while
        the whole stays within ``text_len`` tokens: one forward then trains several answers
        about the image (a multi-turn text dialogue)."""
        parts_i, parts_r, parts_s = [ids], [roles], [scale]
        for j in self.companions(i, len(ids), rng):
            oi, orr, osc = self._item(j)
            parts_i.append(oi)
            parts_r.append(orr)
            parts_s.append(osc)
        return np.concatenate(parts_i), np.concatenate(parts_r), np.concatenate(parts_s)

    def companions(self, i: int, length: int, rng: np.random.Generator) -> list[int]:
        """The items ``_pack`` adds after item ``i`` (of ``length`` tokens): other items of its
        image in a random order (short answers first with ``pack_answers_first``), each taken
        while the whole stays within ``text_len``, up to ``pack_items - 1`` of them."""
        others = [j for j in self.texts_of_image[self.text.meta[i]["image_id"]] if j != i]
        order = [others[k] for k in rng.permutation(len(others)).tolist()]
        if self.mix.pack_answers_first:
            short = [j for j in order if self.text.meta[j].get("task") in SHORT_ANSWER_TASKS]
            order = short + [j for j in order if j not in set(short)]
        chosen: list[int] = []
        total = length
        for j in order:
            if len(chosen) + 1 >= self.mix.pack_items:
                break
            n = len(self._item(j)[0])
            if total + n > self.mix.text_len:
                continue
            chosen.append(j)
            total += n
        return chosen

    # ------------------------------------------------------------------ batches

    def batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """``batch_size`` samples: speech with probability ``p_audio``, else speechless (a fresh QA
        session with probability ``p_qa_session``, else an item of the text shard)."""
        samples, ids = [], []
        for _ in range(batch_size):
            glue = rng.random() < self.mix.p_concat
            if self.spoken_image and rng.random() < self.mix.p_audio:
                i = self.spoken_image[int(rng.integers(len(self.spoken_image)))]
                samples.append(self.speech_sample(i, rng, glue))
                ids.append(sample_id(self.speech.meta[i], "speech", i))
            elif self.mix.p_qa_session > 0 and rng.random() < self.mix.p_qa_session:
                sample, name = self.qa_session(rng, glue)
                samples.append(sample)
                ids.append(name)
            else:
                i = self.texts[int(rng.integers(len(self.texts)))]
                samples.append(self.text_sample(i, rng, glue))
                ids.append(sample_id(self.text.meta[i], "text", i))
        self.last_ids = ids  # the samples of the latest batch (named when its loss is NaN)
        return collate(samples)


def sample_id(meta: dict[str, Any], shard: str, i: int) -> str:
    """A readable id of row ``i`` of a shard: its record id, else task / image and the row."""
    if meta.get("id"):
        return str(meta["id"])
    return f"{shard}[{i}]:{meta.get('task', '')}:{meta.get('image_id', '')}"


def turn_relevance(meta: dict[str, Any], n_frames: int) -> np.ndarray:
    """Per frame: 1 inside a turn (and the gap after it) about the image, 0 otherwise."""
    rel = np.zeros(n_frames, np.int64)
    turns = meta.get("turns") or []
    for k, t in enumerate(turns):
        start = int(t.get("start_frame", 0))
        end = int(turns[k + 1]["start_frame"]) if k + 1 < len(turns) else n_frames
        rel[start:end] = 1 if t.get("topic") == "image" else 0
    return rel


def turn_speaker(meta: dict[str, Any], n_frames: int) -> np.ndarray:
    """Per frame: True inside an assistant turn (and the gap after it), as ``turn_relevance``."""
    out = np.zeros(n_frames, bool)
    turns = meta.get("turns") or []
    for k, t in enumerate(turns):
        start = int(t.get("start_frame", 0))
        end = int(turns[k + 1]["start_frame"]) if k + 1 < len(turns) else n_frames
        out[start:end] = t.get("speaker") == "assistant"
    return out


def _crop_start(rel: np.ndarray, total: int, n: int, rng: np.random.Generator) -> int:
    """A crop start that keeps image talk inside the crop when the sample is too long."""
    if total <= n:
        return 0
    img = np.flatnonzero(rel == 1)
    if len(img) == 0:
        return int(rng.integers(0, total - n + 1))
    lo = max(0, min(int(img[0]), total - n) - n // 2)
    hi = min(total - n, int(img[0]))
    return int(rng.integers(lo, max(lo, hi) + 1))


def collate(samples: list[dict[str, Any]]) -> Batch:
    """Right-pad samples to one length: codes with -1, weights with 0, relevance with -1."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    t = max(s["codes"].shape[1] for s in samples)
    b = len(samples)
    codes = np.full((b, N_ROWS, t), ZERO_TOKEN, np.int64)
    weight = np.zeros((b, t), np.float32)
    rel = np.full((b, t), -1, np.int64)
    asst = np.zeros((b, t), bool)
    for i, s in enumerate(samples):
        n = s["codes"].shape[1]
        codes[i, :, :n] = s["codes"]
        weight[i, :n] = s["text_weight"]
        rel[i, :n] = s["relevance"]
        asst[i, :n] = s.get("assistant", s["text_weight"] > 0)
    return Batch(
        codes=torch.from_numpy(codes),
        text_weight=torch.from_numpy(weight),
        relevance=torch.from_numpy(rel),
        image_index=torch.tensor([s["image"] for s in samples], dtype=torch.long),
        is_speech=torch.tensor([s["speech"] for s in samples], dtype=torch.bool),
        assistant=torch.from_numpy(asst),
    )


def batch_for_step(data: MixedData, batch_size: int, seed: int, step: int, micro: int = 0) -> Batch:
    """The (micro-)batch of update ``step``: a function of ``(seed, step, micro)`` only."""
    return data.batch(batch_size, np.random.default_rng([seed, step, micro]))
