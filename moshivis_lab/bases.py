"""The lab's released tiny bases: the tokenizer, codec, image encoder and speech LM, shipped.

MoshiVis starts from released Moshi, Mimi and SigLIP; the tiny lab starts from its own bases,
pretrained once by ``make pretrain-bases`` and committed under ``bases/<preset>/`` (safetensors,
fp16 where rounding changes nothing measurable, with ``recipe.json``: the stage key of every
part, the stamps of the run that made them, sha256 and size of every file). ``install_bases``
copies them into a data directory with their stage stamps, so every trainer sees its part as
finished; it refuses a part whose recorded key is not the key the code computes now (the
recipe changed: rebuild with ``make pretrain-bases``).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moshivis_lab.artefacts import (
    Stage,
    atomic_path,
    config_hash,
    read_json,
    sha256_file,
    write_json,
)
from moshivis_lab.config import LabConfig, LMConfig

RECIPE_FILE = "recipe.json"
FORMAT = 1
SHIPPED_PRESETS = ("tiny",)


@dataclass(frozen=True)
class Part:
    """One shipped base: its folder under ``<data>/<preset>``, its stage stamp and its files."""

    name: str
    subdir: str
    stamp: str  # the stage name: its stamp is ``.{stamp}.done.json`` in ``subdir``
    files: tuple[str, ...]
    fp16: tuple[str, ...] = ()  # safetensors files whose float tensors are stored as fp16


PARTS = (
    Part("tokenizer", "tokenizer", "tokenizer", ("spm.model",)),
    # the codec stays fp32: its tables are quantiser centroids, and a rounded one moves codes
    Part("codec", "codec", "codec", ("tiny_codec.safetensors", "tiny_codec.json", "report.json")),
    Part(
        "vision",
        "vision",
        "pretrain_vision",
        (
            "vision_tower.safetensors",
            "vision_config.json",
            "siglip/model.safetensors",
            "siglip/config.json",
            "report.json",
            "metrics.jsonl",
        ),
        fp16=("vision_tower.safetensors", "siglip/model.safetensors"),
    ),
    Part(
        "speech_lm",
        "speech_lm",
        "pretrain",
        ("model.safetensors", "metrics.jsonl"),
        fp16=("model.safetensors",),
    ),
)
PART_NAMES = tuple(p.name for p in PARTS)


def bases_root() -> Path:
    """Where shipped bases live: ``$MOSHIVIS_BASES`` or the repository's ``bases/`` folder."""
    env = os.environ.get("MOSHIVIS_BASES")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "bases"


def bases_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """The shipped bases of preset ``name``."""
    return (Path(root) if root is not None else bases_root()) / name


def base_configs(name: str) -> dict[str, Any]:
    """The trainer configs a preset's bases are made with (one place for reproduce, the CLI,
    ``ensure_pretrained`` and the recipe keys): ``speech`` (PretrainConfig), ``vision``
    (VisionPretrainConfig), ``vision_model`` (VisionConfig)."""
    from moshivis_lab.train.pretrain import PretrainConfig
    from moshivis_lab.vision.config import VisionConfig
    from moshivis_lab.vision.pretrain import VisionPretrainConfig, smoke_vision_config

    smoke = name == "smoke"
    return {
        "speech": PretrainConfig.smoke() if smoke else PretrainConfig.tiny(),
        "vision": VisionPretrainConfig.smoke() if smoke else VisionPretrainConfig.tiny(),
        "vision_model": smoke_vision_config() if smoke else VisionConfig.tiny(),
    }


def recipe_keys(cfg: LabConfig, tokenizer: str | os.PathLike[str]) -> dict[str, str]:
    """The stage key of every base as the code computes it now. ``tokenizer``: the tokenizer
    file the bases are trained with (its sha256 is an input of the encoder's key, its
    vocabulary sizes the speech LM, as ``lm_config_for`` does from the shards)."""
    from moshivis_lab.audio.tiny_codec import FORMAT_VERSION
    from moshivis_lab.train.pretrain import run_key as speech_key
    from moshivis_lab.vision.pretrain import run_key as vision_key
    from moshivis_lab.world.tokenizer import TextTokenizer

    c = base_configs(cfg.name)
    vocab = TextTokenizer.load(tokenizer).vocab_size
    lm = LMConfig.tiny(text_card=vocab, card=cfg.codec.cardinality)
    return {
        "tokenizer": config_hash(cfg.world, cfg.tokenizer),
        "codec": config_hash(cfg.world, cfg.codec, FORMAT_VERSION),
        "vision": vision_key(cfg, c["vision_model"], c["vision"], sha256_file(tokenizer)),
        "speech_lm": speech_key(cfg, lm, c["speech"]),
    }


def read_recipe(name: str, root: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """The shipped ``recipe.json`` of preset ``name``, or None when none is shipped."""
    path = bases_dir(name, root) / RECIPE_FILE
    return read_json(path) if path.exists() else None


def check_bases(cfg: LabConfig, root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What is shipped for ``cfg``'s preset and whether it is usable: ``{"shipped": bool,
    "problems": [...], "stale": [parts whose key differs from the code's]}``. A problem is a
    missing or altered file (sha256) or a recipe of another format or preset."""
    d = bases_dir(cfg.name, root)
    recipe = read_recipe(cfg.name, root)
    if recipe is None:
        return {"shipped": False, "dir": str(d), "problems": [], "stale": []}
    problems: list[str] = []
    if recipe.get("format") != FORMAT or recipe.get("preset") != cfg.name:
        problems.append(
            f"{d / RECIPE_FILE}: format {recipe.get('format')} / preset {recipe.get('preset')!r}, "
            f"expected {FORMAT} / {cfg.name!r}"
        )
        return {"shipped": True, "dir": str(d), "problems": problems, "stale": []}
    for part in PARTS:
        for rel, info in recipe["parts"][part.name]["files"].items():
            p = d / part.subdir / rel
            if not p.exists():
                problems.append(f"{p} is missing")
            elif sha256_file(p) != info["sha256"]:
                problems.append(
                    f"{p} differs from the file the recipe recorded (sha256); a Git LFS pointer "
                    "or an edit? restore it with git or rebuild with `make pretrain-bases`"
                )
    if problems:
        return {"shipped": True, "dir": str(d), "problems": problems, "stale": []}
    now = recipe_keys(cfg, d / "tokenizer" / "spm.model")
    stale = [n for n in PART_NAMES if recipe["keys"].get(n) != now[n]]
    return {"shipped": True, "dir": str(d), "problems": problems, "stale": stale, "keys": now}


def install_bases(
    cfg: LabConfig,
    root: str | os.PathLike[str] | None = None,
    *,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Copy the shipped bases of ``cfg``'s preset into ``cfg.data_dir`` with their stage stamps.

    A part is installed only where its stage is not already finished with the same key and no
    run of it is in progress there (its ``state.json``: left to finish). A stale part (the
    recipe changed since it was shipped) is not installed, and the stages after it build it
    from scratch. Returns per part ``installed`` / ``already there`` / ``stale`` / ``in
    progress``, or ``{"shipped": False}`` when nothing is shipped for the preset.
    """
    status = check_bases(cfg, root)
    if not status["shipped"]:
        return {"shipped": False, "dir": status["dir"]}
    if status["problems"]:
        raise RuntimeError(
            "the shipped bases cannot be installed:\n  " + "\n  ".join(status["problems"])
        )
    recipe = read_recipe(cfg.name, root)
    assert recipe is not None
    src = Path(status["dir"])
    out: dict[str, Any] = {"shipped": True, "dir": str(src), "parts": {}}
    blocked = False  # a stale tokenizer changes the encoder's key, a stale codec the shards
    for part in PARTS:
        key = status["keys"][part.name]
        dest = cfg.data_dir / cfg.name / part.subdir
        stage = Stage(dest, part.stamp, key)
        if part.name in status["stale"] or blocked:
            out["parts"][part.name] = "stale"
            blocked = blocked or part.name == "tokenizer"
            log(
                f"[bases] {part.name}: the shipped one was made by another recipe; it is built "
                "from scratch (re-ship with `make pretrain-bases`)"
            )
            continue
        if stage.done:
            out["parts"][part.name] = "already there"
            continue
        if (dest / "state.json").exists():
            out["parts"][part.name] = "in progress"
            log(f"[bases] {part.name}: a run is in progress in {dest}; it is left to finish")
            continue
        for rel in recipe["parts"][part.name]["files"]:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                shutil.copyfile(src / part.subdir / rel, tmp)
        stamp = dict(recipe["parts"][part.name]["stamp"])
        for k in ("stage", "key", "finished"):
            stamp.pop(k, None)
        stage.finish(**stamp, installed_from=str(src))
        out["parts"][part.name] = "installed"
    return out


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _fp16_copy(src: Path, dest: Path) -> None:
    """``src`` (safetensors) with every float32 tensor rounded to fp16, metadata kept. A
    ``dest`` that already holds exactly that is left alone (safetensors writes the metadata
    in no fixed order, so rewriting would change the bytes, not the content)."""
    state, meta = _read_safetensors(src)
    state = {
        k: (t.half() if t.dtype == torch.float32 else t).contiguous() for k, t in state.items()
    }
    if dest.exists():
        old, old_meta = _read_safetensors(dest)
        if old_meta == meta and old.keys() == state.keys():
            if all(old[k].dtype == t.dtype and torch.equal(old[k], t) for k, t in state.items()):
                return
    with atomic_path(dest) as tmp:
        save_file(state, str(tmp), metadata=meta)


def _git_commit() -> str | None:
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def export_bases(
    cfg: LabConfig,
    root: str | os.PathLike[str] | None = None,
    *,
    seconds: dict[str, float] | None = None,
) -> Path:
    """Write the finished bases of ``cfg``'s data directory to ``bases/<preset>/`` (fp16 where
    ``Part.fp16`` says) with ``recipe.json``. Every part must be finished under the key the
    code computes now; ``seconds`` (this build's time per part) goes into the recipe."""
    base = cfg.data_dir / cfg.name
    if not cfg.tokenizer_path.exists():
        raise RuntimeError(
            f"tokenizer is not finished: {cfg.tokenizer_path} is missing; build the bases first "
            "(`make pretrain-bases`)"
        )
    keys = recipe_keys(cfg, cfg.tokenizer_path)
    dest = bases_dir(cfg.name, root)
    parts: dict[str, Any] = {}
    for part in PARTS:
        stage = Stage(base / part.subdir, part.stamp, keys[part.name])
        if not stage.done:
            raise RuntimeError(
                f"{part.name} is not finished under the current recipe in {base / part.subdir} "
                f"(key {keys[part.name]}); build it first (`make pretrain-bases`)"
            )
        files: dict[str, Any] = {}
        for rel in part.files:
            s, t = base / part.subdir / rel, dest / part.subdir / rel
            t.parent.mkdir(parents=True, exist_ok=True)
            if rel in part.fp16:
                _fp16_copy(s, t)
            else:
                with atomic_path(t) as tmp:
                    shutil.copyfile(s, tmp)
            files[rel] = {
                "sha256": sha256_file(t),
                "bytes": t.stat().st_size,
                "stored": "fp16" if rel in part.fp16 else "as built",
            }
        parts[part.name] = {"stamp": stage.info(), "files": files}
    total = sum(f["bytes"] for p in parts.values() for f in p["files"].values())
    recipe = {
        "format": FORMAT,
        "preset": cfg.name,
        "made": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "torch": torch.__version__,
        "command": f"moshivis-lab pretrain-bases --preset {cfg.name}",
        "keys": keys,
        "recipe_key": config_hash(keys),
        "configs": {k: dataclasses.asdict(v) for k, v in base_configs(cfg.name).items()},
        "seconds": seconds or {},
        "bytes": total,
        "checks": {},
        "parts": parts,
    }
    write_json(dest / RECIPE_FILE, recipe)
    return dest


@torch.no_grad()
def fp16_check(cfg: LabConfig, root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What fp16 storage changes: the speech LM's val loss and the encoder's tokens, built
    (fp32, in ``cfg.data_dir``) against shipped (fp16, in ``bases/``)."""
    import numpy as np

    from moshivis_lab.model.checkpoint import load_moshi
    from moshivis_lab.train.pretrain import eval_loss, sample_batch, speech_lm_dir
    from moshivis_lab.vision.encoder import ImageEncoder
    from moshivis_lab.vision.pretrain import vision_dir
    from moshivis_lab.world.shards import load_split

    d = bases_dir(cfg.name, root)
    built = load_moshi(speech_lm_dir(cfg) / "model.safetensors")
    shipped = load_moshi(d / "speech_lm" / "model.safetensors")
    tcfg = base_configs(cfg.name)["speech"]
    val, rng = load_split(cfg, "val")["speech"], np.random.default_rng([tcfg.seed, 10**9])
    batches = [sample_batch(val, tcfg.batch_size, tcfg.seq_len, rng) for _ in range(8)]
    a, b = eval_loss(built, batches), eval_loss(shipped, batches)
    enc32 = ImageEncoder.load(vision_dir(cfg))
    enc16 = ImageEncoder.load(d / "vision")
    g = torch.Generator().manual_seed(0)
    px = torch.rand(8, 3, enc32.config.image_size, enc32.config.image_size, generator=g)
    t32, t16 = enc32.encode(px), enc16.encode(px)
    return {
        "speech_lm_val_loss": {"fp32": a["loss"], "fp16": b["loss"]},
        "encoder_tokens_max_abs_diff": float((t32 - t16).abs().max()),
        "encoder_tokens_rms": float(t32.pow(2).mean().sqrt()),
    }


def pretrain_bases(
    cfg: LabConfig,
    root: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Build the bases from nothing in ``cfg.data_dir`` (data, tokenizer, codec, encoder,
    speech LM; finished stages are skipped), time them, and ship them with ``export_bases``."""
    from moshivis_lab.pipeline import build_data
    from moshivis_lab.train.pretrain import pretrain_speech
    from moshivis_lab.vision.pretrain import pretrain_vision

    c = base_configs(cfg.name)
    seconds: dict[str, float] = {}
    t0 = time.time()
    log("[bases] data, tokenizer, codec, shards ...")
    build_data(cfg, progress=progress)
    seconds["data"] = round(time.time() - t0, 1)
    t0 = time.time()
    log("[bases] image encoder ...")
    report = pretrain_vision(cfg, c["vision"], c["vision_model"], progress=progress)
    while not report.get("finished", True):
        report = pretrain_vision(cfg, c["vision"], c["vision_model"], progress=progress)
    seconds["vision"] = round(time.time() - t0, 1)
    t0 = time.time()
    log("[bases] speech LM ...")
    report = pretrain_speech(cfg, c["speech"], progress=progress)
    while not report.get("finished", True):
        report = pretrain_speech(cfg, c["speech"], progress=progress)
    seconds["speech_lm"] = round(time.time() - t0, 1)
    dest = export_bases(cfg, root, seconds=seconds)
    recipe = read_json(dest / RECIPE_FILE)
    recipe["checks"] = fp16_check(cfg, root)
    write_json(dest / RECIPE_FILE, recipe)
    log(f"[bases] shipped to {dest}: {read_json(dest / RECIPE_FILE)['bytes'] / 1e6:.1f} MB")
    return read_json(dest / RECIPE_FILE)
