"""Build the world: images and scene graphs, tasks, dialogues, speech, tokenizer, codec, shards.

Each stage writes real-format files (see ``formats``), then a stamp ``.done.json`` with the hash of
the config it was built from; a stage whose stamp matches is skipped, so ``moshivis-lab data``
resumes after an interruption and rebuilds only what a config change invalidates. Every item
draws its randomness from ``SeedSequence([seed, stage, split, index])``, so the output does not
depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from moshivis_lab.artefacts import sha256_file
from moshivis_lab.config import LabConfig

SPLITS = ("train", "val", "test", "heldout")
_STAGE_CODES = {"scenes": 1, "tasks": 2, "dialogues": 3, "chitchat": 4, "speech": 5, "codec": 6}


def item_rng(cfg: LabConfig, stage: str, split: str, index: int) -> np.random.Generator:
    """The generator for one item of one stage: independent of order and worker count."""
    return np.random.default_rng(
        np.random.SeedSequence([cfg.world.seed, _STAGE_CODES[stage], SPLITS.index(split), index])
    )


def split_sizes(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` into parts proportional to ``weights`` (largest remainders, exact sum)."""
    w = np.asarray(weights, dtype=np.float64)
    if total == 0 or w.sum() == 0:
        return [0] * len(weights)
    raw = total * w / w.sum()
    base = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - base))[: total - int(base.sum())]:
        base[i] += 1
    return [int(b) for b in base]


def pool_map(
    fn: Callable, jobs: list, workers: int, desc: str, progress: bool, chunksize: int = 8
) -> list:
    """``map`` over jobs with a process pool (fork) when workers > 1, in order, with a progress bar."""
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, unit="it", dynamic_ncols=True)
    out = []
    if workers <= 1 or len(jobs) < 2 * chunksize:
        for j in jobs:
            out.append(fn(j))
            bar.update()
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            for r in pool.imap(fn, jobs, chunksize=chunksize):
                out.append(r)
                bar.update()
    bar.close()
    return out


def iter_files(root: Path, patterns: Iterable[str]) -> list[Path]:
    """Files under ``root`` matching any glob pattern, sorted; hidden files (stage stamps) skipped."""
    return sorted(
        {
            p
            for pat in patterns
            for p in root.glob(pat)
            if p.is_file() and not p.name.startswith(".")
        }
    )


def write_checksums(root: Path, files: Iterable[Path], out: Path) -> str:
    """Write ``sha256sum``-style checksums of ``files`` (relative to ``root``); return the file's hash."""
    from moshivis_lab.artefacts import atomic_open

    with atomic_open(out, "w", encoding="utf-8") as f:
        for p in files:
            f.write(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n")
    return sha256_file(out)
