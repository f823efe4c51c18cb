"""Pretrain the tiny SigLIP (vision + text towers) here, with the sigmoid loss, on the world.

Pairs. The base pairs are the world's captions as any COCO-format reader gives them
(``read_image_texts(cfg, "train")`` items of task ``caption``: 2412 of the 3000 tiny training
images have one). Extra pairs, cheap because the world keeps each image's scene graph:

- ``scene_captions`` (on): the other images get the caption their scene graph gives, by the
  very function that wrote the COCO file, so 3000 images instead of 2412;
- ``p_extra`` (off): with that probability a sample's text is a shorter description the scene
  graph makes true (``world_texts``): one object with size, colour and position ("A small red
  star at the top left."), the count ("There are three objects."), the background, or the
  rendered word ("The word frog.", chosen with ``p_word_text``).

Measured on the tiny world (112 px, patch 14, 300 steps of 64, lr 2e-3): captions only
reached val image-to-caption top-1 66 % / top-5 94 %, with ``p_extra=0.35`` only 6 % / 23 %
(at lr 1e-3, ``p_extra`` 0.5 with ``p_word_text`` 0.5: 6 % / 27 %), and no variant learnt to
tell the rendered words apart in that budget (the word probe below stayed at chance). One
embedding per image that must sit close to every partial truth at once is a harder target.

Regions (``region_weight``, on). One pooled embedding per image can tell a batch's images apart
by their colours and sizes alone, and it did: the frozen tokens of a captions-only tower kept
colour (probe 93 %) but hardly shape (20 %, majority 13 %), and most questions name an object by
its shape. The adapters read the tokens, not the pooled head, so a second sigmoid loss aligns
the tokens themselves: each object's world cell (the mean of the tokens whose centres fall in
it, ``probe.cell_index``) is paired with a text naming the object, and the rendered word's
cells with ``word_text``. The object's text names its shape alone, its size and shape, its
colour and shape, or all three (``region_mix``), so "A star." must match every star whatever
its colour: shape cannot be skipped. Measured on the tiny world (126 px, 800 steps of 64):
shape probe 80 % (captions only: 20 %), colour 100 %, size 99 %, caption top-1 91 % (70 %).

Labels. The sigmoid loss needs to know every true pair in a batch, not only the diagonal: two
images can share a caption, and a partial text ("There are two objects.") is true of many
images. Each image has a set of true texts (its captions and, for the world, every partial text
of its scene graph); ``labels[t, i] = text t is in image i's set``. Texts are canonical
sentences, so equality of strings is equality of meaning.

Loss (Zhai et al. 2023): ``-mean_t sum_i log sigmoid(z_ti * (exp(s) * <x_i, y_t> + b))`` with
``z = +-1``, ``s`` and ``b`` learnt, initialised to log 10 and -log(batch size) (the paper's -10
suits its 32k batches; see ``VisionPretrainConfig.bias_init``).

Everything lives under ``vision_dir(cfg) = cfg.data_dir / cfg.name / "vision"``:
``ckpt/`` + ``state.json`` (resumable; the batch of step ``s`` depends only on ``(seed, s)``),
``metrics.jsonl``, the frozen tower ``vision_config.json`` + ``vision_tower.safetensors`` (what
``load_vision_encoder`` reads), the whole dual encoder as an HF directory ``siglip/``
(``config.json`` + ``model.safetensors``, readable by ``SiglipModel.from_pretrained``),
``report.json`` (retrieval accuracies), and the stage stamp ``.pretrain_vision.done.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from moshivis_lab.artefacts import (
    Stage,
    atomic_open,
    atomic_path,
    claim_run_dir,
    config_hash,
    keep_metrics_upto,
    read_json,
    save_run_checkpoint,
    sha256_file,
    trained_settings,
    write_json,
)
from moshivis_lab.config import TEXT_PAD_ID, LabConfig, _check, _check_types, _positive
from moshivis_lab.train.guard import check_finite
from moshivis_lab.vision.config import VisionConfig
from moshivis_lab.vision.encoder import ImageEncoder, _canonical
from moshivis_lab.vision.preprocess import normalise, open_image, pil_to_rgb, resize_rgb

EOS_ID = 2  # the world's SentencePiece model: unk/EPAD 0, bos 1, eos 2, pad 3
STAGE_NAME = "pretrain_vision"
EVAL_SPLITS = ("val", "heldout")
# what an object's region text names (``region_texts``), in ``region_mix`` order
REGION_KINDS = ("shape", "size shape", "colour shape", "size colour shape")


@dataclass(frozen=True)
class VisionPretrainConfig:
    """Hyper-parameters of the tiny SigLIP pretraining (validated on construction)."""

    steps: int = 800
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 40
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    scene_captions: bool = True  # caption the images that have no caption item from their scene
    p_extra: float = 0.0  # probability that a sample's text is a partial scene description
    p_word_text: float = 0.2  # ... and that this partial text is the word's, if there is a word
    region_weight: float = 1.0  # weight of the region loss (0: captions only; module docstring)
    # probabilities that an object's region text names its shape alone, size + shape,
    # colour + shape, or all three
    region_mix: tuple[float, ...] = (0.4, 0.2, 0.2, 0.2)
    text_len: int = 72  # most tokens per text, EOS included (the position table); longer are cut
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 512
    logit_scale_init: float = math.log(10.0)
    logit_bias_init: float | None = None  # None: -log(batch_size), the prior of a positive
    eval_interval: int = 100
    ckpt_interval: int = 100
    log_interval: int = 10
    minutes: float = 10.0  # wall-clock budget of one invocation; stops (resumably) when spent
    threads: int = 2

    def __post_init__(self) -> None:
        _check_types(self)
        _positive(
            self,
            "steps",
            "batch_size",
            "lr",
            "text_len",
            "text_hidden",
            "text_layers",
            "text_heads",
            "text_intermediate",
            "eval_interval",
            "ckpt_interval",
            "log_interval",
            "minutes",
            "threads",
            "grad_clip",
        )
        n = "VisionPretrainConfig"
        _check(self.batch_size >= 2, n, "batch_size", "needs >= 2 (negatives come from the batch)")
        _check(
            0 <= self.warmup_steps <= self.steps,
            n,
            "warmup_steps",
            f"must be in [0, steps={self.steps}], got {self.warmup_steps}",
        )
        _check(
            0.0 <= self.min_lr_ratio <= 1.0,
            n,
            "min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio}",
        )
        for p in ("p_extra", "p_word_text"):
            v = getattr(self, p)
            _check(0.0 <= v <= 1.0, n, p, f"must be in [0, 1], got {v}")
        _check(
            self.region_weight >= 0, n, "region_weight", f"must be >= 0, got {self.region_weight}"
        )
        mix = tuple(self.region_mix)
        _check(
            len(mix) == len(REGION_KINDS) and min(mix) >= 0 and abs(sum(mix) - 1.0) < 1e-6,
            n,
            "region_mix",
            f"must be {len(REGION_KINDS)} probabilities ({', '.join(REGION_KINDS)}) summing to "
            f"1, got {mix!r}",
        )
        _check(self.weight_decay >= 0, n, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        for b in ("beta1", "beta2"):
            v = getattr(self, b)
            _check(0.0 <= v < 1.0, n, b, f"must be in [0, 1), got {v}")
        _check(
            self.text_hidden % self.text_heads == 0,
            n,
            "text_heads",
            f"must divide text_hidden {self.text_hidden}",
        )
        _check(self.seed >= 0, n, "seed", f"must be >= 0, got {self.seed}")

    @property
    def bias_init(self) -> float:
        """Initial logit bias: ``logit_bias_init``, else ``-log(batch_size)``.

        SigLIP's -10 suits its batches of 32k; with about one positive among B images per text
        the prior log-odds are about ``-log(B)``, so the first steps start near the prior."""
        if self.logit_bias_init is not None:
            return float(self.logit_bias_init)
        return -math.log(self.batch_size)

    def replace(self, **changes: Any) -> VisionPretrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls) -> VisionPretrainConfig:
        """The tiny preset: 800 steps of 64 pairs with the region loss, ~0.36 s each on 2 idle
        CPU cores (301 s with loading and evaluation; at 450 steps the shape probe was 38 % with
        the full phrase only, 80 % at 800 with ``region_mix``). On a busy machine two threads
        thrash (measured 5x slower than one): pass ``threads=1`` there."""
        return cls()

    @classmethod
    def smoke(cls) -> VisionPretrainConfig:
        """Seconds of training for tests and notebook CI (one thread: tiny models gain nothing
        from more, and a busy machine makes thread sync costly)."""
        return cls(
            steps=150,
            batch_size=24,
            lr=3e-3,
            warmup_steps=10,
            text_hidden=64,
            text_intermediate=128,
            eval_interval=75,
            ckpt_interval=75,
            log_interval=10,
            minutes=3.0,
            threads=1,
        )


def smoke_vision_config() -> VisionConfig:
    """A smaller tower for tests: 64 px, patch 8 (64 tokens), width 64, 2 layers."""
    return VisionConfig(
        name="smoke",
        image_size=64,
        patch_size=8,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        intermediate_size=128,
    )


def vision_dir(cfg: LabConfig) -> Path:
    """Where the tiny SigLIP, its checkpoints, metrics and report live."""
    return cfg.data_dir / cfg.name / "vision"


# ---------------------------------------------------------------------------------------------
# Texts


def world_texts(scene: Any) -> list[str]:
    """The partial descriptions a scene graph makes true (see the module docstring)."""
    from moshivis_lab.world import tasks
    from moshivis_lab.world.vocab import BACKGROUNDS

    out = [
        f"{tasks.capitalise(tasks.with_article(tasks.object_phrase(o)))} "
        f"{tasks.position_phrase(o.position)}."
        for o in scene.objects
    ]
    out.append(tasks.count_sentence({}, len(scene.objects)))
    out.append(f"On a {BACKGROUNDS[scene.background]} background.")
    if scene.word is not None:
        out.append(word_text(scene.word))
    return out


def word_text(word: str) -> str:
    """The partial text naming a scene's rendered word."""
    return f"The word {word}."


@dataclass(frozen=True)
class Region:
    """A part of an image its scene graph describes: the world cells it covers, and every text
    true of it (an object's phrases in ``REGION_KINDS`` order, or the rendered word's one)."""

    cells: tuple[tuple[int, int], ...]
    texts: tuple[str, ...]


def region_texts(obj: Any) -> tuple[str, ...]:
    """An object's region texts in ``REGION_KINDS`` order: "A star.", "A small star.", "A red
    star.", "A small red star." """
    from moshivis_lab.world import tasks

    out = []
    for kind in REGION_KINDS:
        words = kind.split()
        phrase = tasks.object_phrase(obj, size="size" in words, colour="colour" in words)
        out.append(f"{tasks.capitalise(tasks.with_article(phrase))}.")
    return tuple(out)


def scene_regions(scene: Any) -> list[Region]:
    """The regions of a scene graph: one per object (its cell), and the rendered word's cells."""
    out = [Region((tuple(o.cell),), region_texts(o)) for o in scene.objects]
    if scene.word is not None and scene.word_cells:
        out.append(Region(tuple(tuple(c) for c in scene.word_cells), (word_text(scene.word),)))
    return out


@dataclass
class PairSet:
    """The images of one split and their texts.

    ``captions[i]``: caption items of image ``i`` (may be empty); ``scene_captions[i]``: the
    caption its scene graph gives (the world's own caption function; empty without scenes);
    ``extras[i]``: its partial texts; ``truths[i]``: every text true of it; ``words[i]``: the
    rendered word, if any; ``regions[i]``: its ``scene_regions`` (empty without scenes)."""

    image_ids: list[str]
    image_paths: list[str]
    captions: list[list[str]]
    scene_captions: list[list[str]]
    extras: list[list[str]]
    truths: list[set[str]]
    words: list[str | None]
    regions: list[list[Region]] = dataclasses.field(default_factory=list)

    def subset(self, rows: Sequence[int]) -> PairSet:
        """The pair set of some of its images."""
        return PairSet(
            **{f.name: [getattr(self, f.name)[i] for i in rows] for f in dataclasses.fields(self)}
        )


def _scene_index(cfg: LabConfig, split: str) -> dict[str, Any]:
    try:
        from moshivis_lab.world.generate import load_scenes

        return {s.id: s for s in load_scenes(cfg)[split]}
    except FileNotFoundError:
        return {}


def load_pairs(cfg: LabConfig, split: str, *, with_scenes: bool = True) -> PairSet:
    """Caption pairs of a split (``read_image_texts``), with the scene graph's partial texts and
    truth sets when the world's ``scenes.json`` is there (``with_scenes``)."""
    from moshivis_lab.world.shards import read_image_texts
    from moshivis_lab.world.tasks import caption as scene_caption

    items = [s for s in read_image_texts(cfg, split) if s.task == "caption"]
    caps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for s in items:
        text = s.turns[-1][1].strip()
        caps.setdefault(s.image_id, [])
        if text not in caps[s.image_id]:
            caps[s.image_id].append(text)
        paths[s.image_id] = s.image_path
    scenes = _scene_index(cfg, split) if with_scenes else {}
    if scenes:
        from moshivis_lab.world.generate import world_paths

        root = world_paths(cfg, split)["images"]
        for sid in scenes:
            paths.setdefault(sid, str(root / f"{sid}.png"))
            caps.setdefault(sid, [])
    ids = sorted(paths)
    extras, fulls, truths, words, regions = [], [], [], [], []
    for i in ids:
        sc = scenes.get(i)
        ex = world_texts(sc) if sc is not None else []
        full = [scene_caption(sc)] if sc is not None else []
        extras.append(ex)
        fulls.append(full)
        truths.append({*caps[i], *ex, *full})
        words.append(sc.word if sc is not None else None)
        regions.append(scene_regions(sc) if sc is not None else [])
    return PairSet(
        ids, [paths[i] for i in ids], [caps[i] for i in ids], fulls, extras, truths, words, regions
    )


def encode_texts(
    tok: Any, texts: Sequence[str], text_len: int
) -> tuple[dict[str, torch.Tensor], int]:
    """Texts -> the text tower's inputs ``[len(texts), L]``, and how many were cut.

    Each text is its tokens + EOS, LEFT-padded with PAD, so the last position (where
    ``SiglipTextModel`` pools) is the EOS token; ``attention_mask`` hides the padding and
    ``position_ids`` number the real tokens from 0 (as if right-padded). (SigLIP's recipe,
    right padding without a mask, pools a PAD token that sees the text only through attention
    diluted by up to 60 other PADs.) ``L`` is the longest text of the batch (at most
    ``text_len``, the position table's size): with the mask and the position ids, the
    padding's length changes nothing.
    """
    seqs, cut = [], 0
    for t in texts:
        toks = [*tok.encode(t), EOS_ID]
        if len(toks) > text_len:
            toks, cut = [*toks[: text_len - 1], EOS_ID], cut + 1
        seqs.append(toks)
    width = max((len(q) for q in seqs), default=1)  # pad to the batch's longest, not text_len
    ids = np.full((len(texts), width), TEXT_PAD_ID, dtype=np.int64)
    mask = np.zeros((len(texts), width), dtype=np.int64)
    pos = np.zeros((len(texts), width), dtype=np.int64)
    for r, toks in enumerate(seqs):
        n = len(toks)
        ids[r, width - n :] = toks
        mask[r, width - n :] = 1
        pos[r, width - n :] = np.arange(n)
    batch = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "position_ids": torch.from_numpy(pos),
    }
    return batch, cut


# ---------------------------------------------------------------------------------------------
# Images


def load_pixels(
    paths: Sequence[str], vcfg: VisionConfig, progress: bool = False, desc: str = "images"
) -> torch.Tensor:
    """``[N, S, S, 3]`` uint8: each image through ``to_rgb`` + the square resize, exactly the
    first half of ``preprocess`` (``normalise`` does the rest per batch)."""
    s = vcfg.image_size
    out = np.empty((len(paths), s, s, 3), dtype=np.uint8)
    for i, p in enumerate(tqdm(paths, disable=not progress, desc=desc, leave=False)):
        rgb = pil_to_rgb(open_image(p))
        arr = resize_rgb(rgb, s, vcfg.resample)
        if arr.dtype != np.uint8:  # a high-bit-depth file: quantise like an 8-bit one
            arr = np.round(arr * 255.0).astype(np.uint8)
        out[i] = arr
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# Model, loss, schedule


def build_siglip(vcfg: VisionConfig, tcfg: VisionPretrainConfig, vocab_size: int) -> Any:
    """A ``transformers.SiglipModel``: ``vcfg``'s tower with a pooling head, a small text tower."""
    from transformers import SiglipConfig, SiglipModel

    vision = vcfg.replace(use_head=True).to_hf().to_dict()
    text = {
        "vocab_size": vocab_size,
        "hidden_size": tcfg.text_hidden,
        "intermediate_size": tcfg.text_intermediate,
        "num_hidden_layers": tcfg.text_layers,
        "num_attention_heads": tcfg.text_heads,
        "max_position_embeddings": tcfg.text_len,
        "projection_size": vcfg.hidden_size,
        "pad_token_id": TEXT_PAD_ID,
        "bos_token_id": 1,
        "eos_token_id": EOS_ID,
        "hidden_act": vcfg.hidden_act,
        "layer_norm_eps": vcfg.layer_norm_eps,
    }
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():
        model.logit_scale.fill_(tcfg.logit_scale_init)
        model.logit_bias.fill_(tcfg.bias_init)
    return model


def embed_images(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised pooled image embeddings ``[B, D]``."""
    return F.normalize(model.vision_model(pixel_values=pixel_values).pooler_output, dim=-1)


def embed_texts(model: Any, texts: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2-normalised pooled text embeddings ``[B, D]`` of an ``encode_texts`` batch."""
    return F.normalize(model.text_model(**texts).pooler_output, dim=-1)


def sigmoid_loss(
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """SigLIP's loss with explicit labels ``[T, I]`` (1 = the text is true of the image)."""
    logits = text_emb @ image_emb.t() * logit_scale.exp() + logit_bias
    signs = 2.0 * labels.to(logits.dtype) - 1.0
    return -F.logsigmoid(signs * logits).sum(dim=-1).mean()


def lr_at(step: int, tcfg: VisionPretrainConfig) -> float:
    """Learning rate of update ``step`` (0-based): linear warmup, then cosine to the floor."""
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    progress = (step - tcfg.warmup_steps) / max(1, tcfg.steps - tcfg.warmup_steps)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return tcfg.lr * (tcfg.min_lr_ratio + (1.0 - tcfg.min_lr_ratio) * cos)


def make_optimizer(model: Any, tcfg: VisionPretrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on 1-D tensors (norms, biases, logit scale/bias) and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "embedding" in name or "probe" in name else decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": tcfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=tcfg.lr,
        betas=(tcfg.beta1, tcfg.beta2),
    )


def batch_for_step(
    pairs: PairSet, tcfg: VisionPretrainConfig, step: int
) -> tuple[np.ndarray, list[str]]:
    """Image indices and texts of update ``step``: a function of ``(seed, step)`` only.

    Distinct images; each text is a partial description with probability ``p_extra`` (when the
    image has some), else one of its captions (with ``scene_captions``, the scene graph's
    caption when it has no caption item).
    A partial text is the word's (``word_text``) with probability ``p_word_text`` when the image
    has a word, else one of the others, uniformly."""
    rng = np.random.default_rng([tcfg.seed, step])
    usable = _usable(pairs, tcfg)
    idx = usable[rng.permutation(len(usable))[: tcfg.batch_size]]
    texts = []
    for i in idx:
        caps = pairs.captions[i] or (pairs.scene_captions[i] if tcfg.scene_captions else [])
        extra = pairs.extras[i]
        word = pairs.words[i]
        if extra and (not caps or rng.random() < tcfg.p_extra):
            if word is not None and rng.random() < tcfg.p_word_text:
                texts.append(word_text(word))
            else:
                others = [t for t in extra if word is None or t != word_text(word)]
                texts.append(others[int(rng.integers(len(others)))])
        else:
            texts.append(caps[int(rng.integers(len(caps)))])
    return idx, texts


def region_batch(
    pairs: PairSet, idx: np.ndarray, tcfg: VisionPretrainConfig, step: int, grid_side: int
) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """The region loss's inputs for update ``step`` (a function of ``(seed, step)`` only, drawn
    apart from ``batch_for_step``'s, so its batches do not change with ``region_weight``).

    Returns ``pool [R, B * T]`` (row ``r`` averages the tokens of region ``r``: ``T`` tokens per
    image, batch-major, each token in the cell its centre falls in), the distinct picked texts
    ``[U]`` and ``labels [U, R]`` (1 where the text is true of the region, e.g. "A star." of
    every star of the batch)."""
    from moshivis_lab.vision.probe import GRID, cell_index

    rng = np.random.default_rng([tcfg.seed, step, 1])
    cells = torch.from_numpy(cell_index(grid_side))
    n_tok = grid_side * grid_side
    rows, picked, truths = [], [], []
    for b, i in enumerate(idx):
        for reg in pairs.regions[int(i)]:
            row = torch.zeros(len(idx) * n_tok)
            for r, c in reg.cells:
                row[b * n_tok : (b + 1) * n_tok] += (cells == r * GRID + c).float()
            rows.append(row / row.sum().clamp_min(1.0))
            k = (
                int(rng.choice(len(tcfg.region_mix), p=tcfg.region_mix))
                if len(reg.texts) > 1
                else 0
            )
            picked.append(reg.texts[k])
            truths.append(set(reg.texts))
    texts = sorted(set(picked))
    pool = torch.stack(rows) if rows else torch.zeros(0, len(idx) * n_tok)
    labels = torch.tensor([[1.0 if t in tr else 0.0 for tr in truths] for t in texts])
    return pool, texts, labels.reshape(len(texts), len(truths))


def _usable(pairs: PairSet, tcfg: VisionPretrainConfig) -> np.ndarray:
    """Images that can be trained on: with a caption item, or a scene graph to caption them
    (``scene_captions``) or to describe them in part (``p_extra > 0``)."""
    ok = [
        i
        for i in range(len(pairs.image_ids))
        if pairs.captions[i]
        or (tcfg.scene_captions and pairs.scene_captions[i])
        or (tcfg.p_extra > 0 and pairs.extras[i])
    ]
    return np.asarray(ok, dtype=np.int64)


def labels_for(pairs: PairSet, idx: np.ndarray, texts: Sequence[str]) -> torch.Tensor:
    """``[T, I]`` float: 1 where text ``t`` is true of batch image ``i``."""
    return torch.tensor([[1.0 if t in pairs.truths[int(i)] else 0.0 for i in idx] for t in texts])


# ---------------------------------------------------------------------------------------------
# Retrieval


def retrieval_scores(
    sim: torch.Tensor, truth: Sequence[set[int]], ks: Sequence[int] = (1, 5)
) -> dict[str, float | int]:
    """Image-to-text retrieval from similarities ``[n_images, n_texts]``.

    ``truth[i]``: the columns that are correct for image ``i``. ``top{k}``: share of images
    with a correct text among their ``k`` best; ``chance_top{k}``: the same for a random
    ranking (``1 - C(N - m, k) / C(N, k)`` with ``m`` correct of ``N``, averaged)."""
    n_img, n_txt = sim.shape
    if n_img == 0 or n_txt == 0:
        raise ValueError("retrieval needs at least one image and one text")
    order = sim.argsort(dim=1, descending=True).numpy()
    out: dict[str, float | int] = {"n_images": n_img, "n_candidates": n_txt}
    for k in ks:
        kk = min(k, n_txt)
        hits = [bool(set(order[i, :kk].tolist()) & truth[i]) for i in range(n_img)]
        chance = [
            1.0 - math.comb(n_txt - len(truth[i]), kk) / math.comb(n_txt, kk) for i in range(n_img)
        ]
        out[f"top{k}"] = float(np.mean(hits))
        out[f"chance_top{k}"] = float(np.mean(chance))
    return out


@torch.no_grad()
def image_embeddings(
    model: Any, pixels: torch.Tensor, vcfg: VisionConfig, batch: int = 64
) -> torch.Tensor:
    """Normalised pooled embeddings ``[N, D]`` of ``[N, S, S, 3]`` uint8 pixels (eval mode)."""
    model.eval()
    out = [
        embed_images(model, normalise(pixels[i : i + batch], vcfg.image_mean, vcfg.image_std))
        for i in range(0, len(pixels), batch)
    ]
    return torch.cat(out)


@torch.no_grad()
def text_embeddings(
    model: Any, tok: Any, texts: Sequence[str], text_len: int, batch: int = 64
) -> torch.Tensor:
    """Normalised pooled embeddings ``[N, D]`` of texts (eval mode)."""
    model.eval()
    out = []
    for i in range(0, len(texts), batch):
        enc, _ = encode_texts(tok, texts[i : i + batch], text_len)
        out.append(embed_texts(model, enc))
    return torch.cat(out)


def evaluate_retrieval(
    model: Any,
    tok: Any,
    pairs: PairSet,
    pixels: torch.Tensor,
    vcfg: VisionConfig,
    text_len: int,
    word_probe: bool = True,
) -> dict[str, Any]:
    """Image-to-caption retrieval over a split's captioned images (candidates: every distinct
    caption of the split).

    With ``word_probe`` and scene graphs naming words, an OCR probe as well: each image that
    shows a word is matched against its own caption with the word replaced by each word of the
    split ("..., with the word frog written on it." / "... the word lamp ..."), so only the
    word tells the candidates apart (chance: one over the number of words)."""
    keep = [i for i, c in enumerate(pairs.captions) if c]
    if not keep:
        raise ValueError("no captioned images in this split; nothing to retrieve")
    cands = sorted({t for i in keep for t in pairs.captions[i]})
    col = {t: j for j, t in enumerate(cands)}
    img = image_embeddings(model, pixels[keep], vcfg)
    txt = text_embeddings(model, tok, cands, text_len)
    res: dict[str, Any] = {
        "caption": retrieval_scores(
            img @ txt.t(), [{col[t] for t in pairs.captions[i]} for i in keep]
        )
    }
    if word_probe:
        probe = _word_probe(model, tok, pairs, pixels, vcfg, text_len)
        if probe is not None:
            res["word"] = probe
    return res


def _word_probe(
    model: Any,
    tok: Any,
    pairs: PairSet,
    pixels: torch.Tensor,
    vcfg: VisionConfig,
    text_len: int,
) -> dict[str, Any] | None:
    rows, bases = [], []
    for i, w in enumerate(pairs.words):
        caps = pairs.captions[i] or pairs.scene_captions[i]
        key = f"the word {w} written"
        base = next((c for c in caps if key in c), None) if w else None
        if base is not None:
            rows.append(i)
            bases.append((base, key))
    words = sorted({pairs.words[i] for i in rows})  # type: ignore[type-var]
    if len(words) < 2:
        return None
    img = image_embeddings(model, pixels[rows], vcfg)
    sims = torch.empty(len(rows), len(words))
    for r, (base, key) in enumerate(bases):
        variants = [base.replace(key, f"the word {v} written") for v in words]
        sims[r] = text_embeddings(model, tok, variants, text_len) @ img[r]
    return retrieval_scores(sims, [{words.index(pairs.words[i])} for i in rows])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Checkpoints


def run_key(cfg: LabConfig, vcfg: VisionConfig, tcfg: VisionPretrainConfig, tok_sha: str) -> str:
    """The vision run's key: world, tokenizer (config and file), tower and what is trained."""
    trained = trained_settings(tcfg)
    return config_hash(cfg.world, cfg.tokenizer, vcfg, trained, tok_sha)


def _save_checkpoint(
    out: Path, model: Any, opt: torch.optim.Optimizer, step: int, elapsed: float, key: str
) -> None:
    """Write the step's model + optimizer files, then point ``state.json`` at them; prune old."""

    def write(path: Path) -> None:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})

    save_run_checkpoint(
        out, step=step, elapsed=elapsed, key=key, optimizer=opt, write_weights=write
    )


def save_siglip(model: Any, directory: Path) -> Path:
    """The dual encoder as an HF directory (``config.json`` + ``model.safetensors``), atomically."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    with atomic_open(directory / "config.json", "w", encoding="utf-8") as f:
        f.write(model.config.to_json_string())
    return directory


def load_siglip(cfg: LabConfig, out_dir: str | Path | None = None) -> Any:
    """The pretrained dual encoder (vision tower with its pooling head, text tower), in eval mode."""
    from transformers import SiglipConfig, SiglipModel

    d = Path(out_dir) if out_dir is not None else vision_dir(cfg)
    if not (d / "siglip" / "model.safetensors").exists():
        raise FileNotFoundError(_not_trained(cfg, d))
    raw = read_json(d / "siglip" / "config.json")  # (from_pretrained warns about defaults)
    conf = SiglipConfig(text_config=raw["text_config"], vision_config=raw["vision_config"])
    model = SiglipModel(conf)
    model.load_state_dict(load_file(d / "siglip" / "model.safetensors"), strict=True)
    return model.eval()


def _not_trained(cfg: LabConfig, d: Path) -> str:
    return (
        f"no pretrained image encoder under {d}; run `moshivis-lab pretrain-vision --preset "
        f"{cfg.name}` (or moshivis_lab.vision.pretrain_vision(cfg)) first"
    )


def load_vision_encoder(
    cfg: LabConfig,
    *,
    out_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ImageEncoder:
    """The frozen tiny image encoder pretrained by ``pretrain_vision`` (tokens, no head)."""
    d = Path(out_dir) if out_dir is not None else vision_dir(cfg)
    if not (d / "vision_tower.safetensors").exists():
        raise FileNotFoundError(_not_trained(cfg, d))
    return ImageEncoder.load(d, device=device, dtype=dtype, frozen=True)


def export_encoder(model: Any, vcfg: VisionConfig) -> ImageEncoder:
    """The vision tower of a trained ``SiglipModel`` as a frozen ``ImageEncoder`` (head dropped)."""
    enc = ImageEncoder.from_config(vcfg.replace(use_head=False))
    state = {
        _canonical(k): v
        for k, v in model.vision_model.state_dict().items()
        if not _canonical(k).startswith("head.")
    }
    enc._load_canonical(state)
    return enc


# ---------------------------------------------------------------------------------------------
# The run


def pretrain_vision(
    cfg: LabConfig,
    tcfg: VisionPretrainConfig | None = None,
    vcfg: VisionConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
    max_new_steps: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train (or resume, or skip when finished) the tiny SigLIP; freeze and save its vision
    tower; return the report (retrieval top-1/top-5 on val and heldout beside chance).

    ``out_dir`` defaults to ``vision_dir(cfg)``. ``max_new_steps`` stops this invocation after
    that many updates (checkpointed, resumable). A run directory made with other settings raises
    a ValueError unless ``overwrite`` (which deletes it).
    """
    from moshivis_lab.world.tokenizer import TextTokenizer

    tcfg = tcfg or VisionPretrainConfig.tiny()
    vcfg = vcfg or VisionConfig.tiny()
    if max_new_steps is not None and max_new_steps < 1:
        raise ValueError(f"max_new_steps must be >= 1, got {max_new_steps}")
    out = Path(out_dir) if out_dir is not None else vision_dir(cfg)
    if not cfg.tokenizer_path.exists():
        raise FileNotFoundError(
            f"{cfg.tokenizer_path}: no tokenizer; build the world first with "
            f"`moshivis-lab data --preset {cfg.name}`"
        )
    tok = TextTokenizer.load(cfg.tokenizer_path)
    key = run_key(cfg, vcfg, tcfg, sha256_file(cfg.tokenizer_path))
    stage = Stage(out, STAGE_NAME, key)
    claim_run_dir(
        out,
        key,
        overwrite,
        stage=stage,
        what="vision run",
        how="pass overwrite=True (CLI: --overwrite) to delete it and start again",
    )
    if stage.done and (out / "report.json").exists():
        return read_json(out / "report.json")

    threads_before = torch.get_num_threads()
    torch.set_num_threads(tcfg.threads)
    try:
        return _train(cfg, tcfg, vcfg, tok, out, key, stage, progress, max_new_steps)
    finally:
        torch.set_num_threads(threads_before)


def _train(
    cfg: LabConfig,
    tcfg: VisionPretrainConfig,
    vcfg: VisionConfig,
    tok: Any,
    out: Path,
    key: str,
    stage: Stage,
    progress: bool,
    max_new_steps: int | None,
) -> dict[str, Any]:
    state_path, metrics_path = out / "state.json", out / "metrics.jsonl"
    t_load = time.time()
    with_scenes = tcfg.p_extra > 0 or tcfg.scene_captions or tcfg.region_weight > 0
    train = load_pairs(cfg, "train", with_scenes=with_scenes)
    if tcfg.region_weight > 0 and not any(train.regions):
        raise ValueError(
            f"region_weight={tcfg.region_weight} needs the world's scene graphs, and "
            f"{cfg.name}'s train split has none (world/scenes.json): rebuild the world "
            "(`moshivis-lab data`) or pass region_weight=0 to train on captions only"
        )
    if tcfg.region_weight > 0:
        from moshivis_lab.vision.probe import GRID, cell_index

        if len(set(cell_index(vcfg.grid_side).tolist())) < GRID * GRID:
            raise ValueError(
                f"region_weight={tcfg.region_weight} pools the tokens of each world cell, and a "
                f"{vcfg.grid_side} x {vcfg.grid_side} token grid leaves some of the {GRID} x "
                f"{GRID} cells without a token: use a grid of at least {GRID} tokens a side "
                "(image_size / patch_size) or region_weight=0"
            )
    usable = _usable(train, tcfg)
    if len(usable) < tcfg.batch_size:
        raise ValueError(
            f"only {len(usable)} trainable images in {cfg.name}'s train split, fewer than "
            f"batch_size={tcfg.batch_size}; lower the batch size or build a bigger world"
        )
    evals = {s: load_pairs(cfg, s) for s in EVAL_SPLITS}
    train_pixels = load_pixels(train.image_paths, vcfg, progress, "load train images")
    eval_pixels = {
        s: load_pixels(p.image_paths, vcfg, progress, f"load {s} images") for s, p in evals.items()
    }
    load_s = time.time() - t_load

    torch.manual_seed(tcfg.seed)
    model = build_siglip(vcfg, tcfg, tok.vocab_size)
    opt = make_optimizer(model, tcfg)
    step, elapsed_before = 0, 0.0
    if state_path.exists():
        st = read_json(state_path)
        model.load_state_dict(load_file(out / "ckpt" / st["model"]), strict=True)
        blob = torch.load(out / "ckpt" / st["optim"], weights_only=True)
        opt.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"])
        step, elapsed_before = int(st["step"]), float(st["elapsed_s"])
        keep_metrics_upto(metrics_path, step)
    elif metrics_path.exists():
        metrics_path.unlink()
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.time()
    budget_s = tcfg.minutes * 60.0
    stop_at = tcfg.steps if max_new_steps is None else min(tcfg.steps, step + max_new_steps)
    first_losses: list[float] = []
    recent: list[float] = []
    stopped = "steps"
    n_cut = 0
    bar = tqdm(total=tcfg.steps, initial=step, disable=not progress, desc="pretrain vision")
    with open(metrics_path, "a", encoding="utf-8") as mf:
        while step < stop_at:
            if time.time() - t_start >= budget_s:
                stopped = "time budget"
                break
            t0 = time.time()
            idx, texts = batch_for_step(train, tcfg, step)
            ids, cut = encode_texts(tok, texts, tcfg.text_len)
            n_cut += cut
            labels = labels_for(train, idx, texts)
            pv = normalise(train_pixels[torch.from_numpy(idx)], vcfg.image_mean, vcfg.image_std)
            lr = lr_at(step, tcfg)
            for g in opt.param_groups:
                g["lr"] = lr
            model.train()
            vis = model.vision_model(pixel_values=pv)
            caption_loss = sigmoid_loss(
                embed_texts(model, ids),
                F.normalize(vis.pooler_output, dim=-1),
                labels,
                model.logit_scale,
                model.logit_bias,
            )
            region_loss = torch.zeros(())
            if tcfg.region_weight > 0:
                pool, rtexts, rlabels = region_batch(train, idx, tcfg, step, vcfg.grid_side)
                if len(rtexts):
                    rids, rcut = encode_texts(tok, rtexts, tcfg.text_len)
                    n_cut += rcut
                    hidden = vis.last_hidden_state.reshape(-1, vis.last_hidden_state.shape[-1])
                    region_loss = sigmoid_loss(
                        embed_texts(model, rids),
                        F.normalize(pool @ hidden, dim=-1),
                        rlabels,
                        model.logit_scale,
                        model.logit_bias,
                    )
            loss = caption_loss + tcfg.region_weight * region_loss
            ids_of = [train.image_ids[int(i)] for i in idx]  # named if the loss is NaN / inf
            check_finite("vision pretraining", step + 1, {"loss": loss.detach()}, ids_of, out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            check_finite("vision pretraining", step + 1, {"grad_norm": norm}, ids_of, out)
            opt.step()
            dt = time.time() - t0
            step += 1
            lv = float(loss.detach())
            if len(first_losses) < 10:
                first_losses.append(lv)
            recent = (recent + [lv])[-20:]
            bar.update(1)
            bar.set_postfix(loss=f"{lv:.3f}")
            elapsed = elapsed_before + time.time() - t_start
            if step % tcfg.log_interval == 0 or step == stop_at:
                rec = {
                    "step": step,
                    "split": "train",
                    "loss": lv,
                    "caption_loss": float(caption_loss.detach()),
                    "region_loss": float(region_loss.detach()),
                    "lr": lr,
                    "grad_norm": float(norm),
                    "logit_scale": float(model.logit_scale.detach().exp()),
                    "logit_bias": float(model.logit_bias.detach()),
                    "positives_per_text": float(labels.sum(1).mean()),
                    "pairs_per_s": len(idx) / dt,
                    "elapsed_s": elapsed,
                }
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
            if step % tcfg.eval_interval == 0 or step == tcfg.steps:
                r = evaluate_retrieval(
                    model, tok, evals["val"], eval_pixels["val"], vcfg, tcfg.text_len, False
                )
                rec = {"step": step, "split": "val", "elapsed_s": elapsed}
                rec |= {f"caption_{k}": v for k, v in r["caption"].items()}
                rec |= {f"word_{k}": v for k, v in r.get("word", {}).items()}
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
        "stopped_by": "steps" if finished else stopped,
        "train_seconds": round(elapsed, 2),
        "load_seconds": round(load_s, 2),
        "train_loss_first10": float(np.mean(first_losses)) if first_losses else None,
        "train_loss_last20": float(np.mean(recent)) if recent else None,
        "texts_cut": n_cut,
        "train_images": int(len(usable)),
        "dir": str(out),
        "vision": vcfg.to_dict(),
        "pretrain": dataclasses.asdict(tcfg),
    }
    if not finished:
        return report

    model.eval()
    retrieval: dict[str, Any] = {}
    for s in EVAL_SPLITS:
        retrieval[s] = evaluate_retrieval(model, tok, evals[s], eval_pixels[s], vcfg, tcfg.text_len)
    sub = [i for i, c in enumerate(train.captions) if c][: len(evals["val"].image_ids)]
    train_sub = train.subset(sub)
    retrieval["train_subset"] = evaluate_retrieval(
        model, tok, train_sub, train_pixels[sub], vcfg, tcfg.text_len
    )
    encoder = export_encoder(model, vcfg)
    encoder.save(out)
    save_siglip(model, out / "siglip")
    report |= {
        "retrieval": retrieval,
        "encoder": {
            "tokens": vcfg.num_tokens,
            "grid_side": vcfg.grid_side,
            "hidden_size": vcfg.hidden_size,
            "parameters": encoder.num_parameters(),
        },
        "siglip_parameters": {
            "vision_with_head": sum(p.numel() for p in model.vision_model.parameters()),
            "text": sum(p.numel() for p in model.text_model.parameters()),
        },
        "text": {
            "tokenizer": str(cfg.tokenizer_path),
            "text_len": tcfg.text_len,
            "pad_id": TEXT_PAD_ID,
        },
    }
    write_json(out / "report.json", report)
    stage.finish(**{k: report[k] for k in ("step", "train_seconds")})
    return report
