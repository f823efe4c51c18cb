"""Pretrain the tiny Moshi from scratch on the world's spoken dialogues (text + both audio streams).

Batches are random ``seq_len``-frame crops of the train split's aligned grids ``[17, T]`` (shorter
grids are padded with the zero token -1, which the model masks out of the loss), most starting
just before a user turn; each step also sees a batch of text-only dialogues (the text LM that
Moshi inherits from Helium, which MoshiVis' speechless samples rely on). AdamW with linear
warmup and a cosine decay; the loss is ``MoshiLM.loss``. Everything lives under
``cfg.data_dir / cfg.name / "speech_lm"``:

- ``ckpt/model_XXXXXX.safetensors`` (``save_moshi``) + ``ckpt/optim_XXXXXX.pt`` (optimizer and
  torch RNG state, read back with ``torch.load(weights_only=True)``), and ``state.json`` naming
  the latest pair (written last, atomically: a crash never leaves a half checkpoint in use);
- ``metrics.jsonl`` (one line per logged step / evaluation);
- ``model.safetensors`` and ``.pretrain.done.json`` once every step has run.

A rerun resumes from ``state.json``; a finished run is skipped. The batch of step ``s`` depends
only on ``(seed, s)``, so an interrupted-and-resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from moshivis_lab.artefacts import (
    Stage,
    claim_run_dir,
    config_hash,
    keep_metrics_upto,
    read_json,
    save_run_checkpoint,
    trained_settings,
)
from moshivis_lab.config import ZERO_TOKEN, LabConfig, LMConfig, _check, _check_types, _positive
from moshivis_lab.model.checkpoint import load_moshi, load_weights, save_moshi
from moshivis_lab.model.lm import MoshiLM
from moshivis_lab.train.guard import check_finite
from moshivis_lab.world.shards import ShardReader, load_split

LOSS_KEYS = ("loss", "text_loss", "audio_loss", "semantic_loss", "acoustic_loss")


@dataclass(frozen=True)
class PretrainConfig:
    """Hyper-parameters of speech-LM pretraining (validated on construction)."""

    steps: int = 4000
    batch_size: int = 8
    seq_len: int = 128  # frames per crop (12.5 Hz: 128 = 10.24 s)
    # Share of crops that start just before a user turn (0-8 frames early), so that a question
    # and the assistant's answer to it sit in the same crop; the rest start anywhere.
    p_turn_crop: float = 0.75
    # Share of crops that start just before a user question with a checkable answer (a chit-chat
    # fact, a sum, a name: ``qa`` entries asked by the user, not about an image), drawn from the
    # dialogues that have one; the rest follow ``p_turn_crop``. The answer word is the rarest and
    # most telling text target. Measured from scratch at the tiny preset (1000 steps) together
    # with ``chat_text_share=0.5``: with the val questions written out as text, the answer
    # accuracy went from 23 % to 50 %; from the user's speech it stayed at 3-7 % (152 val
    # dialogues), so what the tiny LM lacks there is recognising the spoken words.
    p_qa_crop: float = 0.5
    # Listening batches: each step also trains on ``listen_batch_size`` short crops of
    # ``listen_len`` frames that start 0-8 frames before a user question (as ``p_qa_crop``'s),
    # i.e. the question, the pause and the assistant's answer with little else. Recognising a
    # spoken content word ("polar bear") needs many hearings of it, and a 128-frame crop spends
    # most of its compute elsewhere: with 4 long crops plus 8 listening crops of 56 frames (about
    # the compute of 8 long crops) a step hears 10 questions instead of 4. Measured from scratch
    # at the tiny preset (1000 steps, all 152 val questions, two runs): spoken QA 6.6 % -> 9.2 %
    # at text temperature 0.7 (both runs) and 6.6 % -> 10.5-13.8 % greedy; the price is the
    # modelling of everything else, val audio NLL 0.377 -> 0.487 and text NLL 0.162 -> 0.180
    # (half the long crops). Downstream, the adapters trained on that LM answered validation
    # VQA (text prompts) worse, 32 % against 40 %, as speechless samples are read through the
    # LM's text modelling. So the tiny preset keeps it off; try ``batch_size=4,
    # listen_batch_size=8`` to trade speech modelling for listening.
    listen_batch_size: int = 0
    listen_len: int = 56
    # Text-only batches, as Moshi inherits from its text LM (Helium): each step also trains on
    # ``text_batch_size`` dialogues written out in the text stream (user and assistant tokens one
    # after another, audio rows the zero token), weighted ``text_only_weight`` in the loss. This is
    # what lets MoshiVis' speechless samples be read later. 0 turns it off.
    text_batch_size: int = 8
    text_len: int = 96
    text_only_weight: float = 1.0
    # Share of the text-only dialogues drawn from the chit-chat transcripts (facts the world
    # defines, answerable without an image); the rest from the whole corpus, which is mostly
    # speechless image-text samples.
    chat_text_share: float = 0.5
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_interval: int = 200
    eval_batches: int = 4  # fixed val batches (of batch_size crops) per evaluation
    ckpt_interval: int = 200
    log_interval: int = 10
    minutes: float = 14.5  # wall-clock budget of one invocation; stops (resumably) when spent
    threads: int = 2

    def __post_init__(self) -> None:
        _check_types(self)  # a value of the wrong kind fails here, the field named
        _positive(
            self,
            "steps",
            "batch_size",
            "seq_len",
            "lr",
            "eval_interval",
            "eval_batches",
            "ckpt_interval",
            "log_interval",
            "minutes",
            "threads",
            "grad_clip",
        )
        name = "PretrainConfig"
        _check(
            0 <= self.warmup_steps <= self.steps,
            name,
            "warmup_steps",
            f"must be in [0, steps={self.steps}], got {self.warmup_steps}",
        )
        _check(
            0.0 <= self.min_lr_ratio <= 1.0,
            name,
            "min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio}",
        )
        _check(
            self.weight_decay >= 0, name, "weight_decay", f"must be >= 0, got {self.weight_decay}"
        )
        _check(
            0.0 <= self.p_turn_crop <= 1.0,
            name,
            "p_turn_crop",
            f"must be in [0, 1], got {self.p_turn_crop}",
        )
        for n in ("p_qa_crop", "chat_text_share"):
            v = getattr(self, n)
            _check(0.0 <= v <= 1.0, name, n, f"must be in [0, 1], got {v}")
        _check(self.text_batch_size >= 0, name, "text_batch_size", "must be >= 0")
        _check(self.listen_batch_size >= 0, name, "listen_batch_size", "must be >= 0")
        _check(self.listen_len >= 8, name, "listen_len", f"must be >= 8, got {self.listen_len}")
        _check(self.text_len >= 8, name, "text_len", f"must be >= 8, got {self.text_len}")
        _check(self.text_only_weight >= 0, name, "text_only_weight", "must be >= 0")
        for n in ("beta1", "beta2"):
            v = getattr(self, n)
            _check(0.0 <= v < 1.0, name, n, f"must be in [0, 1), got {v}")
        _check(self.seed >= 0, name, "seed", f"must be >= 0, got {self.seed}")

    def replace(self, **changes: Any) -> PretrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls) -> PretrainConfig:
        """The tiny preset, the recipe of the shipped base (``bases/tiny``): 4000 steps of
        8 x 128 frames plus 8 text-only dialogues, 0.5-0.9 s each on 2 idle CPU cores, so
        `make pretrain-bases` spends 35-60 min here (RESULTS.md has what the steps bought)."""
        return cls()

    @classmethod
    def smoke(cls) -> PretrainConfig:
        """A few seconds of training for tests and notebook CI. No question crops: a 32-frame
        crop that starts at a question holds only the user speaking, and six such steps teach
        the model that its own channel is silence (every generated code the same)."""
        return cls(
            steps=6,
            batch_size=2,
            seq_len=32,
            p_qa_crop=0.0,
            chat_text_share=0.0,
            text_batch_size=2,
            text_len=32,
            lr=3e-3,
            warmup_steps=2,
            eval_interval=3,
            eval_batches=1,
            ckpt_interval=3,
            log_interval=1,
            minutes=2.0,
        )


def speech_lm_dir(cfg: LabConfig) -> Path:
    """Where the pretrained speech LM, its checkpoints and metrics live."""
    return cfg.data_dir / cfg.name / "speech_lm"


def lm_config_for(cfg: LabConfig) -> LMConfig:
    """``LMConfig.tiny`` sized to the world's tokenizer and codec (read from the shard manifest)."""
    manifest = read_json(cfg.shards_dir / "manifest.json")
    return LMConfig.tiny(
        text_card=int(manifest["text_vocab"]), card=int(manifest["codec"]["cardinality"])
    )


def lr_at(step: int, tcfg: Any) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine to the floor.

    ``tcfg`` is any trainer config with ``lr``, ``warmup_steps``, ``steps`` and ``min_lr_ratio``.
    """
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    progress = (step - tcfg.warmup_steps) / max(1, tcfg.steps - tcfg.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    cos = 0.5 * (1.0 + math.cos(math.pi * progress))
    return tcfg.lr * (tcfg.min_lr_ratio + (1.0 - tcfg.min_lr_ratio) * cos)


def crop_grid(
    grid: np.ndarray,
    seq_len: int,
    rng: np.random.Generator,
    starts: Sequence[int] | None = None,
) -> np.ndarray:
    """A ``seq_len``-frame crop of ``grid [K, T]``, right-padded with -1 when shorter.

    The crop starts anywhere, or, when ``starts`` (candidate frames, e.g. user-turn onsets) is
    given and not empty, 0-8 frames before one of them picked at random.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    k, t = grid.shape
    out = np.full((k, seq_len), ZERO_TOKEN, dtype=np.int64)
    if t > seq_len:
        last = t - seq_len
        if starts:
            anchor = int(starts[int(rng.integers(0, len(starts)))]) - int(rng.integers(0, 9))
            start = min(max(anchor, 0), last)
        else:
            start = int(rng.integers(0, last + 1))
        out[:] = grid[:, start : start + seq_len]
    else:
        out[:, :t] = grid
    return out


def user_turn_starts(meta: dict[str, Any]) -> list[int]:
    """Frames where the user starts a turn that the assistant answers (from shard metadata)."""
    turns = meta.get("turns") or []
    return [
        int(a["start_frame"])
        for a, b in zip(turns, turns[1:], strict=False)
        if a.get("speaker") == "user" and b.get("speaker") == "assistant" and "start_frame" in a
    ]


def qa_turn_starts(meta: dict[str, Any]) -> list[int]:
    """Frames where the user starts a turn asking a question with a checkable answer that needs
    no image (the dialogue's ``qa`` entries asked by the user, matched to turns by their words)."""
    from moshivis_lab.train.speech_eval import words_of

    asked = {
        tuple(words_of(q.get("question", "")))
        for q in meta.get("qa") or []
        if q.get("asker") == "user" and q.get("topic") != "image"
    }
    return [
        int(t["start_frame"])
        for t in meta.get("turns") or []
        if t.get("speaker") == "user"
        and "start_frame" in t
        and tuple(words_of(t.get("text", ""))) in asked
    ]


QAIndex = list[tuple[int, list[int]]]


def qa_index(reader: ShardReader) -> QAIndex:
    """``(row, question start frames)`` of every dialogue of a shard with a user question."""
    rows = ((i, qa_turn_starts(m)) for i, m in enumerate(reader.meta))
    return [(i, s) for i, s in rows if s]


def _crop_plan(
    reader: ShardReader,
    batch_size: int,
    rng: np.random.Generator,
    p_turn_crop: float,
    p_qa_crop: float,
    qa: QAIndex | None,
) -> list[tuple[int, list[int] | None]]:
    """Which grid each crop of a batch comes from, and the frames it may start just before."""
    if len(reader) == 0:
        raise ValueError(f"{reader.path}: the speech shard is empty; nothing to train on")
    if p_qa_crop > 0 and qa is None:
        qa = qa_index(reader)
    plan: list[tuple[int, list[int] | None]] = []
    for _ in range(batch_size):
        if qa and p_qa_crop > 0 and rng.random() < p_qa_crop:
            plan.append(qa[int(rng.integers(len(qa)))])
            continue
        i = int(rng.integers(len(reader)))
        turn = p_turn_crop > 0 and rng.random() < p_turn_crop
        plan.append((i, user_turn_starts(reader.meta[i]) if turn else None))
    return plan


def sample_batch(
    reader: ShardReader,
    batch_size: int,
    seq_len: int,
    rng: np.random.Generator,
    p_turn_crop: float = 0.0,
    p_qa_crop: float = 0.0,
    qa: QAIndex | None = None,
) -> torch.Tensor:
    """``[B, K, seq_len]`` long tensor of crops of random grids of a speech shard.

    With probability ``p_qa_crop`` a crop starts just before a user question with a checkable
    answer (``qa``: ``qa_index(reader)``, computed when not given); otherwise, with probability
    ``p_turn_crop``, just before any user turn (see ``crop_grid``); else anywhere.
    """
    if p_qa_crop <= 0:  # the plain mix, drawn in its original order (the same batches as before)
        if len(reader) == 0:
            raise ValueError(f"{reader.path}: the speech shard is empty; nothing to train on")
        crops = []
        for i in rng.integers(0, len(reader), size=batch_size):
            turn = p_turn_crop > 0 and rng.random() < p_turn_crop
            starts = user_turn_starts(reader.meta[int(i)]) if turn else None
            crops.append(crop_grid(reader.tokens(int(i)), seq_len, rng, starts))
        return torch.from_numpy(np.stack(crops))
    plan = _crop_plan(reader, batch_size, rng, p_turn_crop, p_qa_crop, qa)
    crops = [crop_grid(reader.tokens(i), seq_len, rng, starts) for i, starts in plan]
    return torch.from_numpy(np.stack(crops))


def batch_for_step(
    reader: ShardReader, tcfg: PretrainConfig, step: int, qa: QAIndex | None = None
) -> torch.Tensor:
    """The training batch of update ``step``: a function of ``(seed, step)`` only."""
    rng = np.random.default_rng([tcfg.seed, step])
    return sample_batch(
        reader, tcfg.batch_size, tcfg.seq_len, rng, tcfg.p_turn_crop, tcfg.p_qa_crop, qa
    )


def _listen_plan(
    reader: ShardReader, tcfg: PretrainConfig, step: int, qa: QAIndex | None
) -> tuple[np.random.Generator, list[tuple[int, list[int]]]]:
    if qa is None:
        qa = qa_index(reader)
    if not qa:
        raise ValueError(
            f"{reader.path}: no dialogue has a user question with a checkable answer, so there "
            "is nothing to listen to; rebuild the world with chit-chat or set listen_batch_size=0"
        )
    rng = np.random.default_rng([tcfg.seed, step, 2])
    return rng, [qa[int(rng.integers(len(qa)))] for _ in range(tcfg.listen_batch_size)]


def listen_batch_for_step(
    reader: ShardReader, tcfg: PretrainConfig, step: int, qa: QAIndex | None = None
) -> torch.Tensor | None:
    """The listening batch of update ``step`` (``[listen_batch_size, K, listen_len]``, crops that
    start 0-8 frames before a user question), or None when ``listen_batch_size`` is 0. A function
    of ``(seed, step)`` only, drawn apart from ``batch_for_step``'s batch."""
    if tcfg.listen_batch_size <= 0:
        return None
    rng, plan = _listen_plan(reader, tcfg, step, qa)
    crops = [crop_grid(reader.tokens(i), tcfg.listen_len, rng, starts) for i, starts in plan]
    return torch.from_numpy(np.stack(crops))


def batch_ids_for_step(
    reader: ShardReader,
    tcfg: PretrainConfig,
    step: int,
    corpus: TextCorpus | None = None,
    qa: QAIndex | None = None,
) -> list[str]:
    """The ids of the samples in ``batch_for_step(reader, tcfg, step)`` (the same draws), then
    those of ``listen_batch_for_step``, plus, with ``corpus``, the rows drawn by
    ``text_batch_for_step``."""
    rng = np.random.default_rng([tcfg.seed, step])
    if tcfg.p_qa_crop <= 0:  # sample_batch's plain mix draws the rows first
        rows = [int(i) for i in rng.integers(0, len(reader), size=tcfg.batch_size)]
    else:
        plan = _crop_plan(reader, tcfg.batch_size, rng, tcfg.p_turn_crop, tcfg.p_qa_crop, qa)
        rows = [i for i, _ in plan]
    if tcfg.listen_batch_size > 0:
        rows += [i for i, _ in _listen_plan(reader, tcfg, step, qa)[1]]
    ids = [str(reader.meta[i].get("id") or f"speech[{i}]") for i in rows]
    if corpus is not None:
        rng = np.random.default_rng([tcfg.seed, step, 1])
        picks = corpus.picks(tcfg.text_batch_size, rng, tcfg.chat_text_share)
        ids += [f"text_corpus[{int(i)}]" for i in picks]
    return ids


def make_optimizer(model: MoshiLM, tcfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms (1-D tensors) and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "emb" in name else decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": tcfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=tcfg.lr,
        betas=(tcfg.beta1, tcfg.beta2),
    )


def _floats(parts: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(parts[k].detach()) for k in LOSS_KEYS}


class TextCorpus:
    """Dialogues of a split as plain token sequences: spoken dialogues' transcripts (both sides)
    and the speechless image-text samples (their words only: no image is seen here)."""

    def __init__(self, cfg: LabConfig, split: str) -> None:
        from moshivis_lab.world.tokenizer import TextTokenizer

        tok = TextTokenizer.load(cfg.tokenizer_path)
        shards = load_split(cfg, split)
        self.samples: list[np.ndarray] = []
        self.chat: list[int] = []  # rows of the chit-chat transcripts (no image needed)
        for m in shards["speech"].meta:
            ids: list[int] = []
            for t in m.get("turns", []):
                ids += tok.encode(t["text"])
            if ids:
                if m.get("kind") == "CHAT":
                    self.chat.append(len(self.samples))
                self.samples.append(np.asarray(ids, np.int64))
        text = shards["text"]
        for i in range(len(text)):
            self.samples.append(np.asarray(text.tokens(i)[0], np.int64))
        if not self.samples:
            raise ValueError(f"split {split!r} has no dialogue text; rebuild the world data")

    def picks(
        self, batch_size: int, rng: np.random.Generator, chat_share: float = 0.0
    ) -> list[int]:
        """Rows of a batch: each a chit-chat transcript with probability ``chat_share``, else
        any sample."""
        if not self.chat or chat_share <= 0:  # the plain draw (the same rows as before)
            return [int(i) for i in rng.integers(0, len(self.samples), batch_size)]
        out = []
        for _ in range(batch_size):
            if rng.random() < chat_share:
                out.append(self.chat[int(rng.integers(len(self.chat)))])
            else:
                out.append(int(rng.integers(len(self.samples))))
        return out

    def batch(
        self, batch_size: int, length: int, rng: np.random.Generator, chat_share: float = 0.0
    ) -> torch.Tensor:
        """``[B, 17, <=length]`` text-only grids (audio rows -1), right-padded with -1; rows as
        ``picks`` draws them."""
        picks = [self.samples[i] for i in self.picks(batch_size, rng, chat_share)]
        crops = []
        for ids in picks:
            if len(ids) > length:
                start = int(rng.integers(0, len(ids) - length + 1))
                ids = ids[start : start + length]
            crops.append(ids)
        t = max(len(c) for c in crops)
        out = np.full((batch_size, 17, t), ZERO_TOKEN, np.int64)
        for b, c in enumerate(crops):
            out[b, 0, : len(c)] = c
        return torch.from_numpy(out)


def text_batch_for_step(corpus: TextCorpus, tcfg: PretrainConfig, step: int) -> torch.Tensor:
    """The text-only batch of update ``step``: a function of ``(seed, step)`` only."""
    rng = np.random.default_rng([tcfg.seed, step, 1])
    return corpus.batch(tcfg.text_batch_size, tcfg.text_len, rng, tcfg.chat_text_share)


def train_step(
    model: MoshiLM,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    lr: float,
    grad_clip: float,
    text_batch: torch.Tensor | None = None,
    text_only_weight: float = 1.0,
    guard: Callable[[dict[str, Any]], None] | None = None,
    listen_batch: torch.Tensor | None = None,
) -> dict[str, float]:
    """One AdamW update on ``batch [B, K, T]`` (plus, if given, a text-only batch whose text loss
    is added with ``text_only_weight``, and a listening batch whose whole loss is added); returns
    the loss parts and the gradient norm.

    ``guard`` (if given) sees ``{"loss": ...}`` before the backward pass and ``{"grad_norm":
    ...}`` before the optimizer step, and may raise to stop (see ``train.guard``)."""
    model.train()
    for g in optimizer.param_groups:
        g["lr"] = lr
    out = model(batch)
    parts = model.loss(batch, out)
    loss = parts["loss"]
    extra: dict[str, float] = {}
    if text_batch is not None:
        text_loss = model.loss(text_batch, model(text_batch))["text_loss"]
        loss = loss + text_only_weight * text_loss
        extra["text_only_loss"] = float(text_loss.detach())
    if listen_batch is not None:
        listen_loss = model.loss(listen_batch, model(listen_batch))["loss"]
        loss = loss + listen_loss
        extra["listen_loss"] = float(listen_loss.detach())
    if guard is not None:
        guard({"loss": loss.detach()})
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if guard is not None:
        guard({"grad_norm": norm})
    optimizer.step()
    return {**_floats(parts), **extra, "grad_norm": float(norm)}


@torch.no_grad()
def eval_loss(model: MoshiLM, batches: list[torch.Tensor]) -> dict[str, float]:
    """Mean loss parts over fixed batches (no gradient)."""
    model.eval()
    sums = dict.fromkeys(LOSS_KEYS, 0.0)
    for b in batches:
        parts = _floats(model.loss(b, model(b)))
        for k in LOSS_KEYS:
            sums[k] += parts[k]
    return {k: v / max(1, len(batches)) for k, v in sums.items()}


def run_key(cfg: LabConfig, lm_cfg: LMConfig, tcfg: PretrainConfig) -> str:
    """The speech LM run's key: world, codec, tokenizer, architecture and what is trained."""
    trained = trained_settings(tcfg)
    return config_hash(cfg.world, cfg.codec, cfg.tokenizer, lm_cfg, trained)


def _save_checkpoint(
    out: Path, model: MoshiLM, opt: torch.optim.Optimizer, step: int, elapsed: float, key: str
) -> None:
    """The step's model + optimizer files, then ``state.json`` pointing at them; older pruned."""
    save_run_checkpoint(
        out,
        step=step,
        elapsed=elapsed,
        key=key,
        optimizer=opt,
        write_weights=lambda path: save_moshi(model, path),
    )


def _guard(step: int, ids: Callable[[], list[str]], out: Path, values: dict[str, Any]) -> None:
    """``check_finite`` for the speech LM (the batch's ids are only looked up on failure)."""
    if all(math.isfinite(float(v)) for v in values.values()):
        return
    check_finite("speech LM pretraining", step, values, ids(), out)


def load_speech_lm(cfg: LabConfig) -> MoshiLM:
    """The pretrained speech LM of ``cfg``: the final model, else the latest checkpoint."""
    out = speech_lm_dir(cfg)
    if (out / "model.safetensors").exists():
        return load_moshi(out / "model.safetensors")
    if (out / "state.json").exists():
        return load_moshi(out / "ckpt" / read_json(out / "state.json")["model"])
    raise FileNotFoundError(
        f"no speech LM under {out}; run `moshivis-lab pretrain-speech --preset {cfg.name}`"
    )


def pretrain_speech(
    cfg: LabConfig,
    tcfg: PretrainConfig,
    progress: bool = True,
    *,
    lm_cfg: LMConfig | None = None,
    max_new_steps: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Train (or resume, or skip when finished) the speech LM; return the run's report.

    ``lm_cfg`` defaults to ``lm_config_for(cfg)``. ``max_new_steps`` stops this invocation after
    that many updates (checkpointed, resumable). A run directory made with other settings raises
    a ValueError unless ``overwrite`` (which deletes it).
    """
    if max_new_steps is not None and max_new_steps < 1:
        raise ValueError(f"max_new_steps must be >= 1, got {max_new_steps}")
    lm_cfg = lm_cfg or lm_config_for(cfg)
    out = speech_lm_dir(cfg)
    key = run_key(cfg, lm_cfg, tcfg)
    stage = Stage(out, "pretrain", key)
    state_path, metrics_path = out / "state.json", out / "metrics.jsonl"
    claim_run_dir(
        out,
        key,
        overwrite,
        stage=stage,
        how="pass overwrite=True (CLI: delete the directory) to start again",
    )
    if stage.done and (out / "model.safetensors").exists():
        return stage.info()

    torch.set_num_threads(tcfg.threads)
    train = load_split(cfg, "train")["speech"]
    val = load_split(cfg, "val")["speech"]
    corpus = TextCorpus(cfg, "train") if tcfg.text_batch_size > 0 else None
    qa = qa_index(train) if tcfg.p_qa_crop > 0 or tcfg.listen_batch_size > 0 else None
    torch.manual_seed(tcfg.seed)
    model = MoshiLM(lm_cfg)
    opt = make_optimizer(model, tcfg)
    step, elapsed_before = 0, 0.0
    if state_path.exists():
        st = read_json(state_path)
        load_weights(model, out / "ckpt" / st["model"])
        blob = torch.load(out / "ckpt" / st["optim"], weights_only=True)
        opt.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"])
        step, elapsed_before = int(st["step"]), float(st["elapsed_s"])
        keep_metrics_upto(metrics_path, step)
    elif metrics_path.exists():
        metrics_path.unlink()
    out.mkdir(parents=True, exist_ok=True)

    eval_rng = np.random.default_rng([tcfg.seed, 10**9])
    val_batches = [
        sample_batch(val, tcfg.batch_size, tcfg.seq_len, eval_rng) for _ in range(tcfg.eval_batches)
    ]
    t_start = time.time()
    budget_s = tcfg.minutes * 60.0
    stop_at = tcfg.steps if max_new_steps is None else min(tcfg.steps, step + max_new_steps)
    recent: list[dict[str, float]] = []
    last_val: dict[str, float] | None = None
    stopped = "steps"
    bar = tqdm(total=tcfg.steps, initial=step, disable=not progress, desc="pretrain speech")
    with open(metrics_path, "a", encoding="utf-8") as mf:
        while step < stop_at:
            if time.time() - t_start >= budget_s:
                stopped = "time budget"
                break
            t0 = time.time()
            batch = batch_for_step(train, tcfg, step, qa)
            tb = text_batch_for_step(corpus, tcfg, step) if corpus is not None else None
            lb = listen_batch_for_step(train, tcfg, step, qa)
            lr = lr_at(step, tcfg)
            guard = functools.partial(
                _guard,
                step + 1,
                lambda s=step: batch_ids_for_step(train, tcfg, s, corpus, qa),
                out,
            )
            parts = train_step(
                model, opt, batch, lr, tcfg.grad_clip, tb, tcfg.text_only_weight, guard, lb
            )
            dt = time.time() - t0
            step += 1
            recent = (recent + [parts])[-20:]
            bar.update(1)
            bar.set_postfix(loss=f"{parts['loss']:.3f}", text=f"{parts['text_loss']:.2f}")
            elapsed = elapsed_before + time.time() - t_start
            if step % tcfg.log_interval == 0 or step == stop_at:
                tokens = int((batch != ZERO_TOKEN).sum())
                rec = {"step": step, "split": "train", **parts, "lr": lr}
                rec |= {"tokens_per_s": tokens / dt, "elapsed_s": elapsed}
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
            if step % tcfg.eval_interval == 0 or step == tcfg.steps:
                last_val = eval_loss(model, val_batches)
                rec = {"step": step, "split": "val", **last_val, "elapsed_s": elapsed}
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
            if step % tcfg.ckpt_interval == 0 and step < stop_at:
                _save_checkpoint(out, model, opt, step, elapsed, key)
    bar.close()
    elapsed = elapsed_before + time.time() - t_start
    _save_checkpoint(out, model, opt, step, elapsed, key)
    finished = step >= tcfg.steps
    report: dict[str, Any] = {
        "step": step,
        "steps": tcfg.steps,
        "finished": finished,
        "stopped_by": stopped if not finished else "steps",
        "elapsed_s": round(elapsed, 2),
        "parameters": model.num_parameters(),
        "train_loss_last20": (
            {k: float(np.mean([r[k] for r in recent])) for k in LOSS_KEYS} if recent else None
        ),
        "val_loss": last_val,
        "dir": str(out),
        "pretrain": dataclasses.asdict(tcfg),
    }
    if finished:
        save_moshi(model, out / "model.safetensors")
        return stage.finish(**report)
    return report
