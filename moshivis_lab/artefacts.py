"""Safe artefact writing: every file is written to a temporary sibling and renamed into place."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_UMASK = os.umask(0)
os.umask(_UMASK)


_SWEPT: set[Path] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_tmp(directory: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Delete the temporary files (``.{name}.{pid}.*.tmp``) that killed writers left in
    ``directory`` (only ``name``'s, when given); a live writer's files are kept."""
    pat = f".{glob.escape(name)}.*.tmp" if name is not None else ".*.tmp"
    gone = []
    for p in Path(directory).glob(pat):
        m = re.fullmatch(r"\..+\.(\d+)\.[^.]+\.tmp", p.name)
        if m and int(m[1]) != os.getpid() and not _pid_alive(int(m[1])):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    If the body raises (or the process dies), ``path`` keeps its previous content and the
    temporary file is removed (or, after SIGKILL, left as ``.{name}.{pid}.*.tmp``: never read,
    and deleted by the next process that writes into that directory).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent not in _SWEPT:  # once per directory and process: world dirs are large
        remove_stale_tmp(path.parent)
        _SWEPT.add(path.parent)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes 0600: give the file the usual umask mode
            tmp_path.chmod(0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", **kw: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` only when closed without error."""
    with atomic_path(path) as tmp, open(tmp, mode, **kw) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write JSON atomically (UTF-8, indented, keys kept in insertion order)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
    return Path(path)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, with an error that names the file when it is missing or corrupt."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; build it first (see `moshivis-lab --help`)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it and rebuild") from e


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# Config fields added after runs were made, each with the value that trains or builds exactly as
# before the field existed. At that value a field is left out of the keys, so adding a knob does
# not turn every finished artefact stale (never change a value here: it would alias old keys).
KEY_NEUTRAL_FIELDS: dict[str, Any] = {
    "listen_batch_size": 0,  # PretrainConfig: no listening crops
    "listen_len": 56,  # PretrainConfig (only read when listen_batch_size > 0)
    "pool_tokens": 0,  # XAConfig: the encoder tokens alone
    "image_tokens": "encoder",  # TrainConfig: the frozen encoder's tokens (not the oracle's)
    "out_proj_init": "default",  # XAConfig: Kyutai's out_proj init (truncated normal)
    "answer_weight": 1.0,  # MixConfig: short answers weigh as any assistant token
    "caption_weight": 1.0,  # MixConfig: captions weigh as any assistant token
    "pack_answers_first": False,  # MixConfig: packed items in a random order
    "p_qa_session": 0.0,  # MixConfig: speechless samples only from the text shard
    "depformer_norm": "mean_square",  # LMConfig: moshi's RMSNorm in the depformer
    "norm_xa": "mean_square",  # XAConfig: moshi's RMSNorm after proj_xa
    "norm_xa_eps": None,  # XAConfig: the LM's norm_eps
    "norm_xa_fp32": True,  # XAConfig: norm_xa computed in float32
    "gate_readout": "lab",  # XAConfig: the lab's reported gate value
    "input_size": None,  # VisionConfig: images at the tower's native size
}


def config_hash(*objs: Any) -> str:
    """A short stable hash of dataclass configs (used in stage stamps); ``data_dir`` and the
    ``KEY_NEUTRAL_FIELDS`` at their neutral values are left out."""

    def plain(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            o = {k: v for k, v in dataclasses.asdict(o).items() if k != "data_dir"}
        if isinstance(o, Path):
            return str(o)
        if isinstance(o, tuple | list):
            return [plain(v) for v in o]
        if isinstance(o, dict):
            return {
                str(k): plain(v)
                for k, v in o.items()
                if not (str(k) in KEY_NEUTRAL_FIELDS and v == KEY_NEUTRAL_FIELDS[str(k)])
            }
        return o

    blob = json.dumps([plain(o) for o in objs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Stage:
    """A resumable build stage: ``done`` when its stamp exists with the same config hash."""

    def __init__(self, directory: Path, name: str, key: str) -> None:
        self.stamp = directory / f".{name}.done.json"
        self.name = name
        self.key = key

    @property
    def done(self) -> bool:
        """True when this stage already finished with the same config."""
        if not self.stamp.exists():
            return False
        try:
            return read_json(self.stamp).get("key") == self.key
        except ValueError:
            return False

    def finish(self, **info: Any) -> dict:
        """Write the stamp (last, after every output of the stage is in place)."""
        rec = {
            "stage": self.name,
            "key": self.key,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **info,
        }
        write_json(self.stamp, rec)
        return rec

    def info(self) -> dict:
        """What the stamp recorded (timings, counts)."""
        return read_json(self.stamp)


def claim_run_dir(
    out: Path, key: str, overwrite: bool, *, how: str, stage: Stage | None = None, what: str = "run"
) -> None:
    """Let a trainer with run key ``key`` use ``out`` (its ``state.json``, its ``stage`` stamp).

    A run there under another key (its config, or the data it was trained on, changed) is an
    error that says ``how`` to start again, unless ``overwrite``, which deletes it first.
    """
    state = out / "state.json"
    old = read_json(state).get("key") if state.exists() else None
    if old is None and stage is not None and stage.stamp.exists() and not stage.done:
        old = read_json(stage.stamp).get("key")
    if old is None or old == key:
        return
    if not overwrite:
        raise ValueError(
            f"{out} holds a {what} with other settings (key {old} != {key}: its config or the "
            f"data it was trained on changed); {how}"
        )
    shutil.rmtree(out)


def save_run_checkpoint(
    out: str | os.PathLike[str],
    *,
    step: int,
    elapsed: float,
    key: str,
    optimizer: Any,
    write_weights: Any,
    prefix: str = "model",
) -> None:
    """One resumable checkpoint of a training run in ``out``.

    Writes ``ckpt/{prefix}_{step}.safetensors`` (through ``write_weights(path)``, which must write
    that file atomically) and ``ckpt/optim_{step}.pt`` (optimizer and torch RNG state, for
    ``torch.load(weights_only=True)``), then points ``state.json`` at them (written last, so a
    crash never leaves a half checkpoint in use) and deletes older checkpoint files.
    """
    import torch

    out = Path(out)
    ck = out / "ckpt"
    ck.mkdir(parents=True, exist_ok=True)
    weights, optim = f"{prefix}_{step:06d}.safetensors", f"optim_{step:06d}.pt"
    write_weights(ck / weights)
    with atomic_path(ck / optim) as tmp:
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, tmp)
    write_json(
        out / "state.json",
        {"key": key, "step": step, "elapsed_s": elapsed, "model": weights, "optim": optim},
    )
    for p in ck.glob("*_*.*"):
        if p.name not in (weights, optim) and not p.name.startswith("."):
            p.unlink(missing_ok=True)
    remove_stale_tmp(ck)  # what a killed run was writing when it died


def keep_metrics_upto(path: str | os.PathLike[str], step: int) -> None:
    """Drop JSONL metric lines logged after ``step`` (a resumed run will log them again)."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("".join(x + "\n" for x in keep))


# Trainer-config fields that do not change what is trained (left out of a run's identity key).
RUNTIME_FIELDS = ("minutes", "eval_interval", "ckpt_interval", "log_interval", "threads")


def trained_settings(tcfg: Any) -> dict[str, Any]:
    """A trainer config (dataclass) as a dict without its ``RUNTIME_FIELDS``: the part of a
    run's identity that decides what is trained, so a resume may change the rest."""
    return {k: v for k, v in dataclasses.asdict(tcfg).items() if k not in RUNTIME_FIELDS}
