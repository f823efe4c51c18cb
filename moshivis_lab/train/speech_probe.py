"""How much of a spoken question can be read from the user's codes? A supervised probe.

The speech LM must recognise a spoken question from the user's audio codes alone. This probe asks
how readable those codes are when nothing else is in the way: a small transformer classifier reads
the codes of the user's question turn (the chosen codebooks; default the semantic codebook 0) and
names the question's reference answer (one class per answer of the training questions). It is
trained on the training split's chit-chat questions, scored on a held-out split's, and the score is
broken down by user voices heard in training versus held-out voices, and by topic.

It is not an upper bound in the strict sense (a bigger model or more steps may read more), but it
is a reference for the speech LM's spoken QA: the LM has to do the same recognition with a far
sparser signal (the answer tokens of its own reply). Sums and comparisons ("what is two plus
three") need arithmetic over recognised words, which a classifier over answers cannot do; their
topics ('arithmetic', 'numbers') say so by scoring low here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from moshivis_lab.artefacts import write_json
from moshivis_lab.config import LabConfig, _check, _check_types, _positive
from moshivis_lab.world.shards import ShardReader, load_split


@dataclass(frozen=True)
class SpeechProbeConfig:
    """What the probe reads (``codebooks`` of the user's stream, at most ``max_frames`` frames of
    the question turn) and how it is trained (validated on construction)."""

    codebooks: tuple[int, ...] = (0,)
    steps: int = 800
    batch_size: int = 64
    dim: int = 192
    layers: int = 3
    heads: int = 4
    max_frames: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    dropout: float = 0.1
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        _check_types(self)
        name = "SpeechProbeConfig"
        books = tuple(int(k) for k in self.codebooks)
        _check(len(books) > 0, name, "codebooks", "must name at least one user codebook")
        _check(
            all(k >= 0 for k in books) and len(set(books)) == len(books),
            name,
            "codebooks",
            f"must be distinct indices >= 0, got {books}",
        )
        object.__setattr__(self, "codebooks", books)
        _positive(self, "steps", "batch_size", "dim", "layers", "heads", "max_frames", "lr")
        _positive(self, "threads")
        _check(self.dim % self.heads == 0, name, "heads", f"must divide dim={self.dim}")
        _check(0.0 <= self.dropout < 1.0, name, "dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.weight_decay >= 0, name, "weight_decay", "must be >= 0")
        _check(self.seed >= 0, name, "seed", f"must be >= 0, got {self.seed}")

    def replace(self, **changes: Any) -> SpeechProbeConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls) -> SpeechProbeConfig:
        """800 steps of 64 questions: about 6-7 min on 2 idle CPU cores."""
        return cls()

    @classmethod
    def smoke(cls) -> SpeechProbeConfig:
        """A few seconds, for tests and notebook CI."""
        return cls(steps=20, batch_size=8, dim=32, layers=1, heads=2, max_frames=32)


def question_turns(reader: ShardReader) -> list[dict[str, Any]]:
    """Every user question with a checkable answer of a speech shard, with its turn's frames:
    ``row, start, end, answer, topic, voice`` (``answer``: the first reference answer)."""
    from moshivis_lab.train.speech_eval import words_of

    out = []
    for row, m in enumerate(reader.meta):
        turns = [t for t in m.get("turns") or [] if t.get("speaker") == "user"]
        for qa in m.get("qa") or []:
            if qa.get("asker") != "user" or qa.get("topic") == "image" or not qa.get("answers"):
                continue
            want = words_of(qa.get("question", ""))
            turn = next((t for t in turns if words_of(t.get("text", "")) == want), None)
            if turn is None or "start_frame" not in turn or "end_frame" not in turn:
                continue
            out.append(
                {
                    "row": row,
                    "start": int(turn["start_frame"]),
                    "end": int(turn["end_frame"]),
                    "answer": " ".join(words_of(qa["answers"][0])),
                    "topic": qa.get("topic", m.get("topic")),
                    "voice": m.get("user_voice"),
                }
            )
    return out


def question_codes(
    reader: ShardReader, items: Sequence[dict[str, Any]], codebooks: Sequence[int], frames: int
) -> torch.Tensor:
    """``[N, len(codebooks), frames]`` user codes of each question turn, shifted by one (0 means
    padding), the turn cut to ``frames``."""
    first_user = None
    out = np.zeros((len(items), len(codebooks), frames), np.int64)
    for n, it in enumerate(items):
        g = np.asarray(reader.tokens(it["row"]))
        if first_user is None:
            first_user = (g.shape[0] - 1) // 2 + 1  # text row, Moshi's rows, then the user's
            n_user = g.shape[0] - first_user
            if max(codebooks) >= n_user:
                raise ValueError(
                    f"codebooks {tuple(codebooks)}: the user stream has {n_user} codebooks"
                )
        seg = g[[first_user + k for k in codebooks], it["start"] : it["end"] + 1][:, :frames]
        out[n, :, : seg.shape[1]] = np.maximum(seg + 1, 0)  # ZERO_TOKEN (-1) -> 0 (padding)
    return torch.from_numpy(out)


class _Probe(nn.Module):
    def __init__(self, pcfg: SpeechProbeConfig, card: int, classes: int) -> None:
        super().__init__()
        d = pcfg.dim
        self.embed = nn.ModuleList([nn.Embedding(card + 1, d) for _ in pcfg.codebooks])
        self.pos = nn.Parameter(torch.zeros(pcfg.max_frames, d))
        layer = nn.TransformerEncoderLayer(
            d, pcfg.heads, 4 * d, pcfg.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, pcfg.layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = sum(e(x[:, j]) for j, e in enumerate(self.embed)) + self.pos[: x.shape[2]]
        pad = (x == 0).all(dim=1)
        h = self.encoder(h, src_key_padding_mask=pad)
        keep = (~pad).float()[..., None]
        return self.head((h * keep).sum(1) / keep.sum(1).clamp_min(1.0))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + batch]).argmax(-1) for i in range(0, len(x), batch)])
    model.train()
    return (pred == y).numpy()


def _by_topic(items: Sequence[dict[str, Any]], ok: np.ndarray) -> dict[str, dict[str, Any]]:
    topics = np.array([str(it["topic"]) for it in items])
    return {
        t: {"n": int((topics == t).sum()), "accuracy": float(ok[topics == t].mean())}
        for t in sorted(set(topics))
    }


def probe_dir(cfg: LabConfig) -> Path:
    """Where the probe's reports go."""
    return cfg.data_dir / "speech_probe"


def probe_spoken_answers(
    cfg: LabConfig,
    pcfg: SpeechProbeConfig | None = None,
    *,
    split: str = "val",
    out_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the probe on the training split's spoken questions and score it on ``split``'s; the
    JSON report (also written to ``out_path`` when given) holds the accuracy overall, for voices
    heard in training and held-out voices, per topic, and beside the majority answer's rate."""
    pcfg = pcfg or SpeechProbeConfig.tiny()
    if split == "train":
        raise ValueError("score the probe on a held-out split ('val', 'test', 'heldout')")
    t0 = time.time()
    train_r, held_r = load_split(cfg, "train")["speech"], load_split(cfg, split)["speech"]
    train, held = question_turns(train_r), question_turns(held_r)
    if not train or not held:
        raise ValueError(
            f"no spoken user questions with answers in the {'train' if not train else split} "
            "split; rebuild the world with chit-chat dialogues"
        )
    answers = sorted({it["answer"] for it in train})
    index = {a: i for i, a in enumerate(answers)}
    x_tr = question_codes(train_r, train, pcfg.codebooks, pcfg.max_frames)
    x_te = question_codes(held_r, held, pcfg.codebooks, pcfg.max_frames)
    y_tr = torch.tensor([index[it["answer"]] for it in train])
    y_te = torch.tensor([index.get(it["answer"], -1) for it in held])  # -1: never right
    card = int(max(x_tr.max(), x_te.max()))
    threads = torch.get_num_threads()
    torch.set_num_threads(pcfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(pcfg.seed)
            model = _Probe(pcfg, card, len(answers))
            opt = torch.optim.AdamW(model.parameters(), pcfg.lr, weight_decay=pcfg.weight_decay)
            gen = torch.Generator().manual_seed(pcfg.seed)
            curve = []
            bar = tqdm(range(pcfg.steps), disable=not progress, desc="speech probe")
            for step in bar:
                pick = torch.randint(0, len(x_tr), (pcfg.batch_size,), generator=gen)
                loss = F.cross_entropy(model(x_tr[pick]), y_tr[pick])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise FloatingPointError(f"the probe's loss is {lv} at step {step}")
                if (step + 1) % max(1, pcfg.steps // 8) == 0 or step + 1 == pcfg.steps:
                    acc = float(_accuracy(model, x_te, y_te).mean())
                    curve.append({"step": step + 1, "loss": lv, "held_out": acc})
                    bar.set_postfix(loss=f"{lv:.3f}", acc=f"{acc:.2f}")
            ok = _accuracy(model, x_te, y_te)
            train_ok = _accuracy(model, x_tr[:1000], y_tr[:1000])
    finally:
        torch.set_num_threads(threads)
    heard = {it["voice"] for it in train}
    seen = np.array([it["voice"] in heard for it in held])
    counts = np.bincount(y_tr.numpy(), minlength=len(answers))
    majority = answers[int(counts.argmax())]
    report: dict[str, Any] = {
        "split": split,
        "preset": cfg.name,
        "probe": dataclasses.asdict(pcfg),
        "n_train": len(train),
        "n": len(held),
        "classes": len(answers),
        "accuracy": float(ok.mean()),
        "train_accuracy": float(train_ok.mean()),
        "majority_accuracy": float(np.mean([it["answer"] == majority for it in held])),
        "seen_voices_n": int(seen.sum()),
        "seen_voices_accuracy": float(ok[seen].mean()) if seen.any() else float("nan"),
        "heldout_voices_n": int((~seen).sum()),
        "heldout_voices_accuracy": float(ok[~seen].mean()) if (~seen).any() else float("nan"),
        "by_topic": _by_topic(held, ok),
        "curve": curve,
        "seconds": round(time.time() - t0, 2),
    }
    if out_path is not None:
        write_json(Path(out_path), report)
    return report


# ---------------------------------------------------------------------- the LM's own state


def _question_states(
    lm: Any,
    reader: ShardReader,
    items: Sequence[dict[str, Any]],
    tokenizer: Any,
    window: int,
    hooks: Sequence[str],
    batch: int = 32,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The residual stream of the frozen LM where it would answer each question, per hook:
    spoken (the dialogue's grid up to two frames after the question's last word, at most
    ``window`` frames) and as text (the question's words alone in the text stream)."""
    from moshivis_lab.config import ZERO_TOKEN

    rows = lm.cfg.num_codebooks
    spoken: dict[str, list[np.ndarray]] = {h: [] for h in hooks}
    text: dict[str, list[np.ndarray]] = {h: [] for h in hooks}
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        codes = torch.full((len(chunk), rows, window), ZERO_TOKEN, dtype=torch.long)
        last = []
        for b, it in enumerate(chunk):
            g = np.asarray(reader.tokens(it["row"]), np.int64)
            end = min(it["end"] + 2, g.shape[1])
            start = max(0, end - window)
            codes[b, :, : end - start] = torch.from_numpy(g[:, start:end])
            last.append(end - start - 1)
        with torch.no_grad():
            _, cache = lm.run_with_cache(codes, names_filter=list(hooks))
        for h in hooks:
            spoken[h] += [cache[h][b, p].float().numpy() for b, p in enumerate(last)]
        qs = [tokenizer.encode(it["question"]) for it in chunk]
        codes = torch.full((len(chunk), rows, max(map(len, qs))), ZERO_TOKEN, dtype=torch.long)
        for b, q in enumerate(qs):
            codes[b, 0, : len(q)] = torch.tensor(q)
        with torch.no_grad():
            _, cache = lm.run_with_cache(codes, names_filter=list(hooks))
        for h in hooks:
            text[h] += [cache[h][b, len(q) - 1].float().numpy() for b, q in enumerate(qs)]
    return (
        {h: np.stack(v) for h, v in spoken.items()},
        {h: np.stack(v) for h, v in text.items()},
    )


def probe_lm_state(
    cfg: LabConfig,
    lm: Any = None,
    *,
    split: str = "val",
    n_train: int = 1500,
    window: int = 96,
    seed: int = 0,
    out_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Does the frozen speech LM know what was asked? A linear probe per layer reads the answer
    of a user's question from the LM's residual stream where it would answer, once for the
    spoken question (its audio in the user's stream) and once for the same words as text.

    Trained on up to ``n_train`` questions of the training split, scored on ``split``'s, split
    into voices heard in training and held-out voices. Text far above spoken says the LM has the
    knowledge but does not recognise the speech (compare ``probe_spoken_answers``, which reads
    the user's codes directly)."""
    from sklearn.linear_model import LogisticRegression

    from moshivis_lab.train.pretrain import load_speech_lm
    from moshivis_lab.world.tokenizer import TextTokenizer

    if split == "train":
        raise ValueError("score the probe on a held-out split ('val', 'test', 'heldout')")
    if n_train < 2 or window < 4:
        raise ValueError(f"n_train must be >= 2 and window >= 4, got {n_train} and {window}")
    t0 = time.time()
    lm = (lm if lm is not None else load_speech_lm(cfg)).eval()
    tok = TextTokenizer.load(cfg.tokenizer_path)
    hooks = [f"temporal.layers.{i}.hook_resid_mid" for i in range(lm.cfg.num_layers)]
    hooks.append("hook_resid_final")
    readers = {s: load_split(cfg, s)["speech"] for s in ("train", split)}
    sets = {}
    for name, reader in readers.items():
        items = question_turns(reader)
        for it in items:  # the question's words, from its turn
            turn = next(
                t
                for t in reader.meta[it["row"]]["turns"]
                if t.get("speaker") == "user" and int(t["start_frame"]) == it["start"]
            )
            it["question"] = turn["text"]
        if name == "train" and len(items) > n_train:
            pick = np.random.default_rng(seed).permutation(len(items))[:n_train]
            items = [items[i] for i in sorted(pick.tolist())]
        if len(items) < 2:
            raise ValueError(
                f"the {name} split has {len(items)} spoken user questions with answers; "
                "rebuild the world with chit-chat dialogues"
            )
        sets[name] = items
    states = {}
    for name in tqdm(sets, disable=not progress, desc="LM states"):
        states[name] = _question_states(lm, readers[name], sets[name], tok, window, hooks)
    y_tr = np.array([it["answer"] for it in sets["train"]])
    y_te = np.array([it["answer"] for it in sets[split]])
    heard = {it["voice"] for it in sets["train"]}
    seen = np.array([it["voice"] in heard for it in sets[split]])
    report: dict[str, Any] = {
        "split": split,
        "preset": cfg.name,
        "n_train": len(y_tr),
        "n": len(y_te),
        "classes": len(set(y_tr.tolist())),
        "answers_seen_in_train": float(np.isin(y_te, y_tr).mean()),
        "majority_accuracy": float(np.mean(y_te == _most_common(y_tr))),
        "window": window,
        "hooks": hooks,
    }
    for k, kind in enumerate(("spoken", "text")):
        rows = []
        for h in hooks:
            x_tr, x_te = states["train"][k][h], states[split][k][h]
            mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
            clf = LogisticRegression(max_iter=400, C=0.5).fit((x_tr - mu) / sd, y_tr)
            ok = clf.predict((x_te - mu) / sd) == y_te
            rows.append(
                {
                    "hook": h,
                    "accuracy": float(ok.mean()),
                    "seen_voices": float(ok[seen].mean()) if seen.any() else float("nan"),
                    "heldout_voices": float(ok[~seen].mean()) if (~seen).any() else float("nan"),
                }
            )
        report[kind] = rows
    report["seconds"] = round(time.time() - t0, 2)
    if out_path is not None:
        write_json(Path(out_path), report)
    return report


def _most_common(values: np.ndarray) -> Any:
    """The most common value of ``values``."""
    uniq, counts = np.unique(values, return_counts=True)
    return uniq[int(counts.argmax())]
