"""What a conversation needs, what of it is missing, and how long building it takes.

Notebook 00 (and anyone about to open the explorer on a fresh clone) says up front what will be
built before building it::

    plan = build_plan(cfg, run="main")   # the artefacts, each built or missing, with estimates
    print(plan)                          # "9 of 9 parts missing ... about 28 min on 2 idle cores"
    ensure_conversation_ready(cfg, run="main", progress=True)   # builds only what is missing

An artefact counts as built when its stage stamp exists (and, for the three trainers, its weights
file). The two pretrainers' stamps are also checked against the settings of today's presets: one
made with other settings is reported as ``stale`` (its trainer refuses to reuse it and says how to
start again). The data stages and the adapter run are not re-keyed here (that needs the data and
the models loaded): a data stage under other settings rebuilds itself when it runs, an adapter run
under other settings is refused by ``train_adapters`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Seconds each stage takes on 2 idle CPU cores: the data stages as their stamps recorded them, the
# trainers from their presets' steps x measured seconds per step (with loading and evaluation).
EXPECTED_SECONDS: dict[str, dict[str, float]] = {
    "tiny": {
        "scenes": 15,
        "texts": 5,
        "speech": 87,
        "tokenizer": 2,
        "codec": 45,
        "shards": 120,
        "speech_lm": 500,
        "vision": 170,
        "adapters": 560,
    },
    "smoke": {
        "scenes": 2,
        "texts": 1,
        "speech": 5,
        "tokenizer": 1,
        "codec": 25,
        "shards": 5,
        "speech_lm": 25,
        "vision": 10,
        "adapters": 10,
    },
}

_WHAT = {
    "scenes": "world images and scene graphs",
    "texts": "captions, VQA, dialogues, chit-chat",
    "speech": "spoken dialogues (espeak-ng TTS)",
    "tokenizer": "SentencePiece tokenizer",
    "codec": "the tiny audio codec",
    "shards": "token shards",
    "speech_lm": "the tiny Moshi (speech LM pretraining)",
    "vision": "the tiny SigLIP (image encoder pretraining)",
    "adapters": "the gated cross-attention adapters",
}


@dataclass(frozen=True)
class Artefact:
    """One built part: its stage name, where its stamp lives, whether it is there, an estimate."""

    name: str
    what: str
    stamp: Path
    built: bool
    seconds: float | None  # expected build time on 2 idle cores (None: no estimate for the preset)
    stale: bool = False  # built, but with other settings than the preset's
    shipped: bool = False  # missing here, but shipped in bases/<preset> (installed in a second)


@dataclass(frozen=True)
class BuildPlan:
    """The artefacts one conversation with run ``run`` needs, in build order."""

    preset: str
    run: str
    artefacts: tuple[Artefact, ...]

    @property
    def missing(self) -> list[Artefact]:
        """The artefacts still to build."""
        return [a for a in self.artefacts if not a.built]

    @property
    def stale(self) -> list[Artefact]:
        """Built artefacts whose settings differ from the preset's (their trainer refuses them)."""
        return [a for a in self.artefacts if a.stale]

    @property
    def seconds(self) -> float | None:
        """Expected seconds to build what is missing or stale (None: a stage has no estimate)."""
        times = [a.seconds for a in self.artefacts if not a.built or a.stale]
        return None if any(t is None for t in times) else float(sum(times))  # type: ignore[arg-type]

    def __str__(self) -> str:
        if not self.missing and not self.stale:
            return (
                f"preset {self.preset}: everything a conversation needs is built "
                f"(adapter run {self.run!r}); nothing to build"
            )
        lines = [
            f"preset {self.preset}: {len(self.missing)} of {len(self.artefacts)} parts missing, "
            f"{len(self.stale)} stale"
        ]
        for a in self.stale:
            lines.append(
                f"  ! {a.name:<10} was built with other settings than the preset's: delete "
                f"{a.stamp.parent} to rebuild it (its trainer refuses to reuse it)"
            )
        for a in self.missing:
            est = "" if a.seconds is None else f"  ~{_duration(a.seconds)}"
            how = " (shipped in bases/: installed, not trained)" if a.shipped else ""
            lines.append(f"  - {a.name:<10} {a.what}{how}{est}")
        total = self.seconds
        lines.append(
            "expected build time: "
            + ("unknown for this preset" if total is None else f"about {_duration(total)}")
            + " on 2 idle CPU cores (longer when the cores are busy); progress bars follow"
        )
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(round(seconds), 1)} s"
    return f"{round(seconds / 60)} min"


def build_plan(cfg: Any, run: str = "main") -> BuildPlan:
    """What one conversation with adapter run ``run`` of preset ``cfg`` needs, built or not."""
    from moshivis_lab.train.adapters import adapters_dir
    from moshivis_lab.train.pretrain import speech_lm_dir
    from moshivis_lab.vision.pretrain import STAGE_NAME, vision_dir

    lm, vis, ad = speech_lm_dir(cfg), vision_dir(cfg), adapters_dir(cfg, run)
    parts = [
        ("scenes", cfg.world_dir / ".scenes.done.json", None),
        ("texts", cfg.world_dir / ".texts.done.json", None),
        ("speech", cfg.world_dir / ".speech.done.json", None),
        ("tokenizer", cfg.tokenizer_path.parent / ".tokenizer.done.json", cfg.tokenizer_path),
        ("codec", cfg.codec_dir / ".codec.done.json", None),
        ("shards", cfg.shards_dir / ".shards.done.json", None),
        ("speech_lm", lm / ".pretrain.done.json", lm / "model.safetensors"),
        ("vision", vis / f".{STAGE_NAME}.done.json", None),
        ("adapters", ad / ".adapters.done.json", ad / "adapters.safetensors"),
    ]
    times = EXPECTED_SECONDS.get(cfg.name, {})
    stale = {name for name, stamp, _ in parts if stamp.exists() and _stale(cfg, name, stamp)}
    shipped = _shipped(cfg)
    return BuildPlan(
        preset=cfg.name,
        run=run,
        artefacts=tuple(
            Artefact(
                name=name,
                what=_WHAT[name],
                stamp=stamp,
                built=stamp.exists() and (out is None or out.exists()),
                seconds=SHIPPED_SECONDS if name in shipped else times.get(name),
                stale=name in stale,
                shipped=name in shipped,
            )
            for name, stamp, out in parts
        ),
    )


SHIPPED_SECONDS = 1.0  # installing a shipped base: a copy


def _shipped(cfg: Any) -> set[str]:
    """The bases shipped for the preset under the recipe the code has now (``bases.py``)."""
    from moshivis_lab.bases import check_bases

    status = check_bases(cfg)
    if not status["shipped"] or status["problems"]:
        return set()
    names = set(status["keys"]) - set(status["stale"])
    return set() if "tokenizer" in status["stale"] else names


def _stale(cfg: Any, name: str, stamp: Path) -> bool:
    """Whether a pretrainer's stamp was made with other settings than ``cfg``'s preset uses."""
    from moshivis_lab.artefacts import read_json, sha256_file

    try:
        from moshivis_lab.bases import base_configs

        c = base_configs(cfg.name)
        if name == "speech_lm":
            from moshivis_lab.train.pretrain import lm_config_for, run_key

            key = run_key(cfg, lm_config_for(cfg), c["speech"])
        elif name == "vision":
            from moshivis_lab.vision.pretrain import run_key

            key = run_key(cfg, c["vision_model"], c["vision"], sha256_file(cfg.tokenizer_path))
        else:
            return False
        return read_json(stamp).get("key") != key
    except (FileNotFoundError, ValueError, KeyError):
        return False  # its inputs are missing or unreadable: the build will say so


def ensure_conversation_ready(
    cfg: Any, run: str = "main", *, progress: bool = True, threads: int | None = None
) -> dict[str, Any]:
    """Build whatever a conversation with adapter run ``run`` needs and is missing (the world,
    the speech LM, the image encoder, then the adapters with ``TrainConfig.smoke()`` at the smoke
    preset and ``TrainConfig.tiny()`` otherwise); finished parts are skipped. ``threads``: torch
    threads for the adapter training (None: the config's). Returns the adapter run's report."""
    from moshivis_lab.train.adapters import TrainConfig, ensure_pretrained, train_adapters

    ensure_pretrained(cfg, progress=progress)
    tcfg = TrainConfig.smoke() if cfg.name == "smoke" else TrainConfig.tiny()
    if threads is not None:
        tcfg = tcfg.replace(threads=threads)
    report = train_adapters(cfg, tcfg, run=run, progress=progress)  # skips a finished run
    while not report.get("finished", True):  # a time budget ran out: resume until done
        report = train_adapters(cfg, tcfg, run=run, progress=progress)
    return report
