"""The ``moshivis-lab`` command line: build data, train, evaluate, ablate, reproduce everything."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Annotated

import typer

from moshivis_lab.config import PRESETS, preset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MoshiVis research workbench.")


# Options are checked when the command line is parsed, before anything is built or written: a bad
# value exits with status 2 and click's "Invalid value for '--option': ..." saying what to pass.


def _check_preset(name: str) -> str:
    if name not in PRESETS:
        raise typer.BadParameter(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return name


def _check_minutes(v: float | None) -> float | None:
    if v is not None and not (math.isfinite(v) and v > 0):
        raise typer.BadParameter(f"must be a number of minutes > 0, got {v}")
    return v


def _check_p_audio(v: float | None) -> float | None:
    if v is not None and not 0.0 <= v <= 1.0:  # NaN fails too
        raise typer.BadParameter(f"must be a probability in [0, 1], got {v}")
    return v


def _check_image_tokens(v: str) -> str:
    from moshivis_lab.train.image_tokens import IMAGE_TOKEN_SOURCES

    if v not in IMAGE_TOKEN_SOURCES:
        raise typer.BadParameter(f"must be one of {', '.join(IMAGE_TOKEN_SOURCES)}, got {v!r}")
    return v


def _check_run(run: str) -> str:
    if not run or "/" in run or "\\" in run or run.startswith("."):
        raise typer.BadParameter(
            f"{run!r} is not a run name: use a plain directory name such as 'main' or 'kv_only'"
        )
    return run


def _check_stages(known: tuple[str, ...], stages: list[str] | None) -> list[str] | None:
    bad = [s for s in stages or () if s not in known]
    if bad:
        raise typer.BadParameter(f"unknown stage(s) {bad}; choose from {list(known)}")
    return stages


def _check_dir(v: Path | None) -> Path | None:
    """A directory the command may create: neither it nor any folder above it is a file."""
    if v is None:
        return v
    for p in (v, *v.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == v else f"cannot be made: {p} is a file"
                raise typer.BadParameter(f"{v} {what}; pass a directory")
            break
    return v


def _out_dir(name: str, help: str) -> typer.models.OptionInfo:
    """An output-directory option: a file there, or above it, is refused at parse time."""
    return typer.Option(name, help=help, file_okay=False, callback=_check_dir)


HELDOUT_SPLITS = ("val", "test", "heldout")


def _check_split(v: str) -> str:
    if v not in HELDOUT_SPLITS:
        raise typer.BadParameter(
            f"must be a held-out split, one of {', '.join(HELDOUT_SPLITS)}; got {v!r}"
        )
    return v


def _check_codebooks(v: str) -> str:
    from moshivis_lab.config import CodecConfig

    n = CodecConfig().num_codebooks
    try:
        books = [int(k) for k in v.split(",")]
    except ValueError as e:
        raise typer.BadParameter(f"codebooks must be integers like 0 or 0,1,2: {e}") from e
    bad = [k for k in books if not 0 <= k < n]
    if bad or len(set(books)) != len(books):
        raise typer.BadParameter(
            f"codebooks must be distinct user codebooks in 0..{n - 1} (0 = semantic), got {v!r}"
        )
    return v


def _check_data_stages(stages: list[str] | None) -> list[str] | None:
    from moshivis_lab.pipeline import DATA_STAGES

    return _check_stages(DATA_STAGES, stages)


def _check_reproduce_stages(stages: list[str] | None) -> list[str] | None:
    from moshivis_lab.reproduce import STAGES

    return _check_stages(STAGES, stages)


PresetOpt = Annotated[
    str,
    typer.Option("--preset", "-p", help=f"one of {sorted(PRESETS)}", callback=_check_preset),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="artefact root (default: ./data)", file_okay=False, callback=_check_dir
    ),
]
SplitOpt = Annotated[
    str, typer.Option(help=f"held-out split ({', '.join(HELDOUT_SPLITS)})", callback=_check_split)
]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]
StepsOpt = Annotated[int | None, typer.Option(help="training steps (default: preset)", min=1)]
MinutesOpt = Annotated[
    float | None,
    typer.Option(
        help="wall-clock budget of this invocation (default: preset)", callback=_check_minutes
    ),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="delete a run made with other settings")
]
RunOpt = Annotated[
    str, typer.Option(help="run name (a directory under adapters/)", callback=_check_run)
]


def _check_checkpoint(v: str | None) -> str | None:
    """A released directory holding the released file set (or a repo id in the local cache)."""
    if v is None:
        return v
    from moshivis_lab.model.release import find_release

    try:
        return str(find_release(v))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def _check_image(v: str | None) -> str | None:
    """A photo name or world id (resolved later), or an image file that must exist."""
    if v is None:
        return v
    if not v.strip():
        raise typer.BadParameter("give a photo name, a world image id or an image file")
    looks_like_file = os.sep in v or Path(v).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
    if looks_like_file and not Path(v).is_file():
        raise typer.BadParameter(f"{v}: no such image file")
    return v


def _check_prompt(v: str | None) -> str | None:
    from moshivis_lab.interp.conversation import MAX_PROMPT_CHARS

    if v is not None and not (0 < len(v.strip()) <= MAX_PROMPT_CHARS):
        raise typer.BadParameter(f"a question of 1 to {MAX_PROMPT_CHARS} characters, got {len(v)}")
    return v


def _check_gate(v: float | None) -> float | None:
    if v is not None and not math.isfinite(v):
        raise typer.BadParameter(f"must be a finite number (0 = the base model), got {v}")
    return v


CheckpointOpt = Annotated[
    str | None,
    typer.Option(
        "--checkpoint",
        help="Kyutai's released directory (or its repo id in the local HF cache) for "
        "--preset moshika-vis (default: $MOSHIVIS_CHECKPOINT)",
        callback=_check_checkpoint,
    ),
]


def _lab_config(preset_name: str, data_dir: Path | None, checkpoint: str | None):  # noqa: ANN202
    """The preset's config; a missing or misplaced checkpoint is a usage error (status 2)."""
    try:
        return preset(preset_name, data_dir, checkpoint)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--checkpoint") from e


@app.command()
def data(
    preset_name: PresetOpt = "tiny",
    data_dir: DataDirOpt = None,
    workers: Annotated[
        int | None, typer.Option(help="processes (default: min(2, cpus))", min=1)
    ] = None,
    stage: Annotated[
        list[str] | None,
        typer.Option("--stage", help="only these stages", callback=_check_data_stages),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Build the offline data world, tokenizer, codec and token shards (resumable)."""
    from moshivis_lab.pipeline import DATA_STAGES, build_data

    cfg = preset(preset_name, data_dir)
    if workers is not None:
        cfg = cfg.replace(workers=workers)
    report = build_data(cfg, progress=not quiet, stages=tuple(stage) if stage else DATA_STAGES)
    typer.echo(json.dumps(_summary(report), indent=1))


def _summary(report: dict) -> dict:
    out = {"preset": report["preset"], "seconds": report["seconds"]}
    for name, info in report["stages"].items():
        out[name] = {k: v for k, v in info.items() if k not in ("key", "stage")}
    return out


@app.command()
def info(preset_name: PresetOpt = "tiny", data_dir: DataDirOpt = None) -> None:
    """Show the preset's configuration and what has been built so far."""
    import dataclasses

    cfg = preset(preset_name, data_dir)
    typer.echo(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
    report = cfg.data_dir / cfg.name / "build_report.json"
    typer.echo(
        report.read_text()
        if report.exists()
        else f"nothing built yet under {cfg.data_dir / cfg.name}"
    )


@app.command("pretrain-speech")
def pretrain_speech_cmd(
    preset_name: PresetOpt = "tiny",
    data_dir: DataDirOpt = None,
    steps: StepsOpt = None,
    minutes: MinutesOpt = None,
    n_dialogues: Annotated[int, typer.Option(help="held-out dialogues to question", min=1)] = 150,
    split: SplitOpt = "val",
    quiet: QuietOpt = False,
) -> None:
    """Build missing data, pretrain the speech LM (resumable), evaluate it, print the report."""
    from moshivis_lab.bases import base_configs
    from moshivis_lab.pipeline import build_data
    from moshivis_lab.train.pretrain import load_speech_lm, pretrain_speech
    from moshivis_lab.train.speech_eval import evaluate_speech_lm

    cfg = preset(preset_name, data_dir)
    tcfg = base_configs(preset_name)["speech"]
    if steps is not None:
        tcfg = tcfg.replace(steps=steps, warmup_steps=min(tcfg.warmup_steps, steps))
    if minutes is not None:
        tcfg = tcfg.replace(minutes=minutes)
    build_data(cfg, progress=not quiet)
    train = pretrain_speech(cfg, tcfg, progress=not quiet)
    model = load_speech_lm(cfg)
    report = evaluate_speech_lm(
        cfg, model, split=split, n_dialogues=n_dialogues, progress=not quiet
    )
    typer.echo(json.dumps({"train": train, "eval": report}, indent=1, default=str))


@app.command("probe-speech")
def probe_speech_cmd(
    preset_name: PresetOpt = "tiny",
    data_dir: DataDirOpt = None,
    codebooks: Annotated[
        str,
        typer.Option(
            help="user codebooks the probe reads, comma-separated (0 = semantic)",
            callback=_check_codebooks,
        ),
    ] = "0",
    steps: StepsOpt = None,
    split: SplitOpt = "val",
    quiet: QuietOpt = False,
) -> None:
    """Build missing data, then train a classifier to name a spoken question's answer from the
    user's codes alone: how much of the speech the codes let a model recognise."""
    from moshivis_lab.pipeline import build_data
    from moshivis_lab.train.speech_probe import (
        SpeechProbeConfig,
        probe_dir,
        probe_spoken_answers,
    )

    books = tuple(int(k) for k in codebooks.split(","))  # checked by _check_codebooks
    cfg = preset(preset_name, data_dir)
    pcfg = SpeechProbeConfig.smoke() if preset_name == "smoke" else SpeechProbeConfig.tiny()
    pcfg = pcfg.replace(codebooks=books, **({"steps": steps} if steps is not None else {}))
    build_data(cfg, progress=not quiet)
    name = "_".join(str(k) for k in pcfg.codebooks)
    out = probe_dir(cfg) / f"{split}_codebooks_{name}.json"
    report = probe_spoken_answers(cfg, pcfg, split=split, out_path=out, progress=not quiet)
    report.pop("curve", None)
    typer.echo(json.dumps({**report, "report": str(out)}, indent=1, default=str))


def _train_config(
    preset_name: str, steps: int | None, minutes: float | None, p_audio: float | None
):  # noqa: ANN202
    from moshivis_lab.train.adapters import TrainConfig

    tcfg = TrainConfig.smoke() if preset_name == "smoke" else TrainConfig.tiny()
    if steps is not None:
        tcfg = tcfg.replace(steps=steps, warmup_steps=min(tcfg.warmup_steps, steps))
    if minutes is not None:
        tcfg = tcfg.replace(minutes=minutes)
    if p_audio is not None:
        tcfg = tcfg.replace(mix=tcfg.mix.replace(p_audio=p_audio))
    return tcfg


@app.command("train")
def train_cmd(
    preset_name: PresetOpt = "tiny",
    data_dir: DataDirOpt = None,
    run: RunOpt = "main",
    steps: StepsOpt = None,
    minutes: MinutesOpt = None,
    p_audio: Annotated[
        float | None,
        typer.Option(
            help="share of speech samples (default: the preset's, 0.1)", callback=_check_p_audio
        ),
    ] = None,
    image_tokens: Annotated[
        str,
        typer.Option(
            help="the adapters' image tokens: encoder (the method) or oracle (symbolic tokens "
            "from the scene graph, an upper-bound ablation; use another --run)",
            callback=_check_image_tokens,
        ),
    ] = "encoder",
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Build what is missing, then train the MoshiVis adapters in one stage (resumable)."""
    from moshivis_lab.train.adapters import ensure_pretrained, train_adapters

    cfg = preset(preset_name, data_dir)
    tcfg = _train_config(preset_name, steps, minutes, p_audio).replace(image_tokens=image_tokens)
    ensure_pretrained(cfg, progress=not quiet)
    report = train_adapters(cfg, tcfg, run=run, overwrite=overwrite, progress=not quiet)
    typer.echo(json.dumps(report, indent=1, default=str))


@app.command("eval")
def eval_cmd(
    preset_name: PresetOpt = "tiny",
    data_dir: DataDirOpt = None,
    run: RunOpt = "main",
    per_type: Annotated[int, typer.Option(help="text-prompt items per question type", min=1)] = 60,
    spoken_per_type: Annotated[
        int, typer.Option(help="spoken-prompt items per question type", min=1)
    ] = 24,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate trained adapters: tasks by text and speech, speech kept, gate AUROC."""
    from moshivis_lab.train.adapters import load_trained
    from moshivis_lab.train.vis_eval import evaluate_moshivis

    cfg = preset(preset_name, data_dir)
    model = load_trained(cfg, run)
    report = evaluate_moshivis(
        cfg,
        model,
        run=run,
        per_type=per_type,
        spoken_per_type=spoken_per_type,
        progress=not quiet,
    )
    typer.echo(json.dumps(report, indent=1, default=str))


@app.command("ablate")
def ablate_cmd(
    preset_name: PresetOpt = "tiny",
    data_dir: DataDirOpt = None,
    steps: Annotated[
        int | None, typer.Option(help="steps per variant (default: preset)", min=1)
    ] = None,
    grid: Annotated[bool, typer.Option(help="run the gating x sharing grid")] = True,
    sweep: Annotated[bool, typer.Option(help="run the p_audio sweep")] = True,
    quiet: QuietOpt = False,
) -> None:
    """Ablations at equal compute (gating x sharing, p_audio sweep); JSON + markdown tables."""
    from moshivis_lab.train.ablate import AblateConfig, run_ablations
    from moshivis_lab.train.adapters import ensure_pretrained

    cfg = preset(preset_name, data_dir)
    acfg = AblateConfig.smoke() if preset_name == "smoke" else AblateConfig.tiny()
    if steps is not None:
        acfg = dataclasses.replace(acfg, steps=steps)
    if not grid:
        acfg = dataclasses.replace(acfg, grid=False)
    if not sweep:
        acfg = dataclasses.replace(acfg, p_audio=())
    ensure_pretrained(cfg, progress=not quiet)
    result = run_ablations(
        cfg, acfg, _train_config(preset_name, None, None, None), progress=not quiet
    )
    typer.echo(result["markdown"])


@app.command("pretrain-vision")
def pretrain_vision_cmd(
    preset_name: PresetOpt = "tiny",
    data_dir: DataDirOpt = None,
    steps: StepsOpt = None,
    minutes: MinutesOpt = None,
    threads: Annotated[
        int | None,
        typer.Option(help="torch threads (default: preset; 1 on a busy machine)", min=1),
    ] = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Build missing data, pretrain the tiny SigLIP with the sigmoid loss on the world's
    image-caption pairs (resumable), freeze its vision tower, print the retrieval report."""
    from moshivis_lab.bases import base_configs
    from moshivis_lab.pipeline import build_data
    from moshivis_lab.vision.pretrain import pretrain_vision

    cfg = preset(preset_name, data_dir)
    c = base_configs(preset_name)
    tcfg, vcfg = c["vision"], c["vision_model"]
    if steps is not None:
        tcfg = tcfg.replace(steps=steps, warmup_steps=min(tcfg.warmup_steps, steps))
    if minutes is not None:
        tcfg = tcfg.replace(minutes=minutes)
    if threads is not None:
        tcfg = tcfg.replace(threads=threads)
    build_data(cfg, progress=not quiet)
    report = pretrain_vision(cfg, tcfg, vcfg, progress=not quiet, overwrite=overwrite)
    typer.echo(json.dumps(report, indent=1, default=str))


@app.command("reproduce")
def reproduce_cmd(
    preset_name: PresetOpt = "tiny",
    data_dir: DataDirOpt = None,
    figures_dir: Annotated[
        Path | None,
        _out_dir("--figures-dir", "where figures and REPORT.md go (default: ./figures for tiny)"),
    ] = None,
    stage: Annotated[
        list[str] | None,
        typer.Option(
            "--stage",
            help="only these stages (in pipeline order)",
            callback=_check_reproduce_stages,
        ),
    ] = None,
    rebuild_bases: Annotated[
        bool,
        typer.Option(
            "--rebuild-bases",
            help="train the tokenizer, codec, encoder and speech LM here instead of installing "
            "the shipped bases (bases/<preset>/)",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """The whole pipeline end to end (resumable: finished stages are skipped), timed per stage,
    ending in the paper figures (PNG + SVG) and REPORT.md. Starts from the shipped bases."""
    from moshivis_lab.reproduce import STAGES, reproduce, reproduce_dir

    cfg = preset(preset_name, data_dir)
    if figures_dir is None:
        tiny_default = preset_name == "tiny" and data_dir is None
        figures_dir = Path("figures") if tiny_default else reproduce_dir(cfg) / "figures"
    timings = reproduce(
        cfg,
        figures_dir=figures_dir,
        stages=tuple(stage) if stage else STAGES,
        progress=not quiet,
        log=typer.echo,
        rebuild_bases=rebuild_bases,
    )
    typer.echo(json.dumps(timings, indent=1, default=str))


@app.command("pretrain-bases")
def pretrain_bases_cmd(
    preset_name: PresetOpt = "tiny",
    data_dir: DataDirOpt = None,
    bases_root: Annotated[
        Path | None,
        _out_dir(
            "--bases-root", "where bases/<preset>/ is written (default: the repository's bases/)"
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Build the bases from nothing (world data, tokenizer, codec, image encoder, speech LM;
    finished stages are skipped) and ship them to bases/<preset>/ with recipe.json."""
    from moshivis_lab.bases import pretrain_bases

    cfg = preset(preset_name, data_dir)
    recipe = pretrain_bases(cfg, bases_root, progress=not quiet, log=typer.echo)
    typer.echo(json.dumps({k: recipe[k] for k in ("keys", "seconds", "bytes", "checks")}, indent=1))


if __name__ == "__main__":
    app()


@app.command("converse")
def converse_cmd(
    preset_name: PresetOpt = "tiny",
    checkpoint: CheckpointOpt = None,
    data_dir: DataDirOpt = None,
    run: RunOpt = "main",
    image: Annotated[
        str | None,
        typer.Option(
            help="a shipped photo's name, a world image id or an image file (default: "
            "the first of the preset's images)",
            callback=_check_image,
        ),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option(help="the question, spoken by the TTS", callback=_check_prompt)
    ] = None,
    audio: Annotated[
        Path | None,
        typer.Option(help="ask with this recording instead", exists=True, dir_okay=False),
    ] = None,
    gate: Annotated[
        float | None,
        typer.Option(
            help="force every gate to this value (0: the base model; default: as trained)",
            callback=_check_gate,
        ),
    ] = None,
    seconds: Annotated[
        float, typer.Option(help="answer time after the question", min=0.4, max=30.0)
    ] = 4.0,
    seed: Annotated[int, typer.Option(help="sampling seed", min=0)] = 0,
    out: Annotated[Path, _out_dir("--out", "where the conversation's files are written")] = Path(
        "conversation"
    ),
) -> None:
    """Ask a question about an image, streaming, and write the conversation: `conversation.wav`
    (both sides), `reply.txt`, `gates.json` (the reported gate per 80 ms step and per layer)."""
    import soundfile as sf

    from moshivis_lab.interp.conversation import ConversationEngine, GateIntervention
    from moshivis_lab.world.photos import PHOTOS

    cfg = _lab_config(preset_name, data_dir, checkpoint)
    engine = ConversationEngine.load(cfg, run)
    picked = image if image is not None else engine.world_images("test")[0]
    question = audio if audio is not None else prompt or PHOTOS.get(picked, "What do you see?")
    conv = engine.run(
        picked,
        str(question),
        intervention=None if gate is None else GateIntervention(value=gate),
        seed=seed,
        extra_seconds=seconds,
    )
    from moshivis_lab.artefacts import atomic_open, atomic_path, write_json

    with atomic_path(out / "conversation.wav") as tmp:
        sf.write(str(tmp), conv.mix(), conv.sample_rate, subtype="PCM_16", format="WAV")
    with atomic_open(out / "reply.txt") as f:
        f.write(conv.reply_text + "\n")
    gates = {
        "layers": list(conv.layers),
        "frame_rate": conv.frame_rate,
        "gate_readout": conv.info.get("gate_readout", "lab"),
        "reported": [round(float(g), 6) for g in conv.gate_score()],
        "per_layer": [[round(float(g), 6) for g in row] for row in conv.gates],
    }
    write_json(out / "gates.json", gates)
    typer.echo(f"{picked}: {conv.prompt or question!s}")
    typer.echo(f"  reply: {conv.reply_text or '(nothing)'}")
    typer.echo(f"  wrote {out}/conversation.wav, reply.txt, gates.json")
