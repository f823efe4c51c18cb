"""The ``moshivis-lab`` command line: build data, inspect artefacts (later: train, eval, figures)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from moshivis_lab.config import PRESETS, preset

os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MoshiVis research workbench.")

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help=f"one of {sorted(PRESETS)}")]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="artefact root (default: ./data)")
]


@app.command()
def data(
    preset_name: PresetOpt = "tiny",
    data_dir: DataDirOpt = None,
    workers: Annotated[int | None, typer.Option(help="processes (default: min(2, cpus))")] = None,
    stage: Annotated[list[str] | None, typer.Option("--stage", help="only these stages")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
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
    steps: Annotated[int | None, typer.Option(help="training steps (default: preset)")] = None,
    minutes: Annotated[
        float | None, typer.Option(help="wall-clock training budget (default: preset)")
    ] = None,
    n_dialogues: Annotated[int, typer.Option(help="held-out dialogues to question")] = 50,
    split: Annotated[str, typer.Option(help="held-out split to evaluate on")] = "val",
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Build missing data, pretrain the speech LM (resumable), evaluate it, print the report."""
    from moshivis_lab.pipeline import build_data
    from moshivis_lab.train.pretrain import PretrainConfig, load_speech_lm, pretrain_speech
    from moshivis_lab.train.speech_eval import evaluate_speech_lm

    cfg = preset(preset_name, data_dir)
    tcfg = PretrainConfig.smoke() if preset_name == "smoke" else PretrainConfig.tiny()
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


if __name__ == "__main__":
    app()
