"""``make reproduce``: the whole pipeline, stage by stage, resumable, timed, ending in figures.

shipped bases (``bases.py``: tokenizer, codec, encoder, speech LM, installed when their recipe
is the code's; ``rebuild_bases`` trains them instead) -> world data -> image encoder (+ linear probes of its tokens) -> speech LM (+ its evaluation) -> adapters (+ evaluation) ->
reduced ablations (gating x sharing, p_audio sweep) -> interpretability report -> prosody ->
paper figures and ``REPORT.md``. Every stage is skipped when its artefacts are there and were
made from the same inputs and settings (the trainers' own stamps; the evaluations are stamped
here with the key of the run they measured), so an interrupted run picks up where it stopped.
Per-stage wall times go to ``<data>/<preset>/reproduce/timings.json`` and into the report.

The tiny preset aims at 30 minutes on 2 idle CPU cores (BUDGET_S; the README gives the measured times).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moshivis_lab.artefacts import Stage, config_hash, read_json, write_json
from moshivis_lab.config import LabConfig, _check, _check_types

STAGES = (
    "bases",
    "data",
    "vision",
    "vision_probes",
    "speech_lm",
    "speech_eval",
    "adapters",
    "eval",
    "ablations",
    "interp",
    "prosody",
    "figures",
)
BUDGET_S = 30 * 60  # the tiny preset's target on 2 CPU cores


@dataclass(frozen=True)
class ReproduceConfig:
    """Evaluation sizes of the reproduce run (training sizes are the presets' own)."""

    run: str = "main"
    threads: int = 2
    speech_dialogues: int = 100
    eval_per_type: int = 40
    eval_spoken_per_type: int = 12
    eval_captions: int = 30
    eval_speech: int = 12
    ablate: str = "reduced"  # an AblateConfig preset: reduced | tiny | smoke
    interp: dict[str, int] = field(
        default_factory=lambda: {
            "auroc_batches": 4,
            "pointing_per_type": 40,
            "attribution_items": 8,
            "audio_items": 2,
            "ig_steps": 32,
            "pixel_steps": 96,
            "dialogues": 4,
            "intervention_prompts": 16,
        }
    )
    prosody_items: int = 4

    def __post_init__(self) -> None:
        _check_types(self)  # a value of the wrong kind fails here, the field named
        name = "ReproduceConfig"
        for f in (
            "threads",
            "speech_dialogues",
            "eval_per_type",
            "eval_spoken_per_type",
            "eval_speech",
            "prosody_items",
        ):
            v = getattr(self, f)
            _check(isinstance(v, int) and v >= 1, name, f, f"must be an int >= 1, got {v!r}")
        _check(self.ablate in ("reduced", "tiny", "smoke"), name, "ablate", "reduced|tiny|smoke")
        _check(bool(self.run), name, "run", "must be a run name")

    @classmethod
    def tiny(cls) -> ReproduceConfig:
        """The evaluation sizes behind the 30-minute budget."""
        return cls()

    @classmethod
    def smoke(cls) -> ReproduceConfig:
        """Seconds per stage: tests and CI."""
        return cls(
            threads=1,
            speech_dialogues=4,
            eval_per_type=2,
            eval_spoken_per_type=1,
            eval_captions=2,
            eval_speech=2,
            ablate="smoke",
            interp={
                "auroc_batches": 1,
                "pointing_per_type": 2,
                "attribution_items": 2,
                "audio_items": 1,
                "ig_steps": 4,
                "pixel_steps": 4,
                "dialogues": 1,
                "intervention_prompts": 2,
            },
            prosody_items=1,
        )

    @classmethod
    def for_preset(cls, name: str) -> ReproduceConfig:
        """``smoke`` for the smoke preset, else ``tiny``."""
        return cls.smoke() if name == "smoke" else cls.tiny()


def reproduce_dir(cfg: LabConfig) -> Path:
    """Where the stage stamps and timings of ``reproduce`` live."""
    return cfg.data_dir / cfg.name / "reproduce"


def _stamp_key(path: Path) -> str:
    """The key of a finished trainer's stamp (what the evaluations after it are keyed on)."""
    if not path.exists():
        raise RuntimeError(f"{path} is missing: the stage that writes it did not finish")
    return str(read_json(path).get("key"))


def _evaluated(
    cfg: LabConfig, name: str, inputs: tuple[Any, ...], out: Path, fn: Callable[[], Any]
) -> dict[str, Any]:
    """Run evaluation ``fn`` unless a stamp with the same inputs and its output ``out`` exist."""
    stage = Stage(reproduce_dir(cfg), name, config_hash(*inputs))
    if stage.done and out.exists():
        return {**stage.info(), "reused": True}
    reproduce_dir(cfg).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    fn()
    return stage.finish(seconds=round(time.time() - t0, 2), output=str(out))


class Reproduction:
    """The stages as methods; ``run`` walks them in order (see ``STAGES``)."""

    def __init__(
        self,
        cfg: LabConfig,
        rcfg: ReproduceConfig | None = None,
        *,
        figures_dir: str | Path | None = None,
        progress: bool = True,
        log: Callable[[str], Any] = print,
        rebuild_bases: bool = False,
    ) -> None:
        self.cfg = cfg
        self.rebuild_bases = rebuild_bases
        self.rcfg = rcfg or ReproduceConfig.for_preset(cfg.name)
        self.figures_dir = Path(figures_dir) if figures_dir else reproduce_dir(cfg) / "figures"
        self.progress = progress
        self.log = log
        self.smoke = cfg.name == "smoke"

    # ------------------------------------------------------------------ training stages

    def bases(self) -> dict[str, Any]:
        """Install the shipped bases (skipped with ``rebuild_bases``: the stages after build them)."""
        from moshivis_lab.bases import install_bases

        if self.rebuild_bases:
            self.log("[reproduce] bases: rebuilding from scratch (rebuild_bases)")
            return {"rebuild": True}
        out = install_bases(self.cfg, log=self.log)
        if not out["shipped"]:
            self.log(f"[reproduce] bases: none shipped for {self.cfg.name!r}; they are built")
        return out

    def data(self) -> dict[str, Any]:
        from moshivis_lab.pipeline import build_data

        return build_data(self.cfg, progress=self.progress)

    def vision(self) -> dict[str, Any]:
        from moshivis_lab.bases import base_configs
        from moshivis_lab.vision.pretrain import pretrain_vision

        c = base_configs(self.cfg.name)
        vt, vc = c["vision"], c["vision_model"]
        report = pretrain_vision(self.cfg, vt, vc, progress=self.progress)
        while not report.get("finished", True):
            report = pretrain_vision(self.cfg, vt, vc, progress=self.progress)
        return report

    def vision_probes(self) -> dict[str, Any]:
        """Linear probes of the frozen encoder's tokens per object attribute (``vision.probe``)."""
        from moshivis_lab.vision.pretrain import STAGE_NAME, vision_dir
        from moshivis_lab.vision.probe import probe_encoder, probes_path

        key = _stamp_key(vision_dir(self.cfg) / f".{STAGE_NAME}.done.json")
        out = probes_path(self.cfg)
        return _evaluated(
            self.cfg,
            "vision_probes",
            (key,),
            out,
            lambda: probe_encoder(self.cfg, out_path=out, progress=self.progress),
        )

    def speech_lm(self) -> dict[str, Any]:
        from moshivis_lab.bases import base_configs
        from moshivis_lab.train.pretrain import pretrain_speech

        tcfg = base_configs(self.cfg.name)["speech"]
        report = pretrain_speech(self.cfg, tcfg, progress=self.progress)
        while not report.get("finished", True):  # a per-invocation time budget ran out
            report = pretrain_speech(self.cfg, tcfg, progress=self.progress)
        return report

    def train_config(self) -> Any:
        from moshivis_lab.train.adapters import TrainConfig

        return TrainConfig.smoke() if self.smoke else TrainConfig.tiny()

    def adapters(self) -> dict[str, Any]:
        from moshivis_lab.train.adapters import train_adapters

        tcfg = self.train_config()
        report = train_adapters(self.cfg, tcfg, run=self.rcfg.run, progress=self.progress)
        while not report.get("finished", True):
            report = train_adapters(self.cfg, tcfg, run=self.rcfg.run, progress=self.progress)
        return report

    # ---------------------------------------------------------------- evaluation stages

    def _lm_key(self) -> str:
        from moshivis_lab.train.pretrain import speech_lm_dir

        return _stamp_key(speech_lm_dir(self.cfg) / ".pretrain.done.json")

    def _run_key(self, run: str | None = None) -> str:
        from moshivis_lab.train.adapters import adapters_dir

        return _stamp_key(adapters_dir(self.cfg, run or self.rcfg.run) / ".adapters.done.json")

    def speech_eval(self) -> dict[str, Any]:
        from moshivis_lab.train.pretrain import load_speech_lm, speech_lm_dir
        from moshivis_lab.train.speech_eval import evaluate_speech_lm

        out = speech_lm_dir(self.cfg) / "eval_val.json"
        n = self.rcfg.speech_dialogues
        return _evaluated(
            self.cfg,
            "speech_eval",
            (self._lm_key(), n),
            out,
            lambda: evaluate_speech_lm(
                self.cfg,
                load_speech_lm(self.cfg),
                n_dialogues=n,
                out_path=out,
                progress=self.progress,
            ),
        )

    def eval(self) -> dict[str, Any]:
        from moshivis_lab.train.adapters import adapters_dir, load_trained
        from moshivis_lab.train.vis_eval import evaluate_moshivis

        r, run = self.rcfg, self.rcfg.run
        out = adapters_dir(self.cfg, run) / "eval.json"
        sizes = (r.eval_per_type, r.eval_spoken_per_type, r.eval_captions, r.eval_speech)
        return _evaluated(
            self.cfg,
            "eval",
            (self._run_key(), *sizes),
            out,
            lambda: evaluate_moshivis(
                self.cfg,
                load_trained(self.cfg, run),
                run=run,
                per_type=r.eval_per_type,
                spoken_per_type=r.eval_spoken_per_type,
                n_captions=r.eval_captions,
                n_speech=r.eval_speech,
                out_path=out,
                progress=self.progress,
            ),
        )

    def ablate_config(self) -> Any:
        from moshivis_lab.train.ablate import AblateConfig

        return getattr(AblateConfig, self.rcfg.ablate)()

    def ablations(self) -> dict[str, Any]:
        from moshivis_lab.train.ablate import run_ablations
        from moshivis_lab.train.mix import SPEECHLESS_FORMAT
        from moshivis_lab.vision.pretrain import vision_dir

        acfg = self.ablate_config()
        out = self.cfg.data_dir / self.cfg.name / "ablations" / "ablations.json"
        vis_key = _stamp_key(vision_dir(self.cfg) / ".pretrain_vision.done.json")
        return _evaluated(
            self.cfg,
            "ablations",
            # the variants are trained here, so what their samples look like is an input too
            (
                self._lm_key(),
                vis_key,
                dataclasses.asdict(acfg),
                self.train_config(),
                {"speechless_format": SPEECHLESS_FORMAT},
            ),
            out,
            lambda: run_ablations(self.cfg, acfg, self.train_config(), progress=self.progress),
        )

    def interp(self) -> dict[str, Any]:
        from moshivis_lab.interp.report import interp_dir, interp_report

        out = interp_dir(self.cfg) / "report.json"
        sizes = dict(self.rcfg.interp)
        return _evaluated(
            self.cfg,
            "interp",
            (self._run_key(), sizes),
            out,
            lambda: interp_report(
                self.cfg, self.rcfg.run, out_path=out, progress=self.progress, **sizes
            ),
        )

    def prosody(self) -> dict[str, Any]:
        from moshivis_lab.interp.prosody import p_audio_runs, prosody_path, prosody_report

        out = prosody_path(self.cfg)
        sweep = {p: self._run_key(name) for p, name in p_audio_runs(self.cfg).items()}
        n = self.rcfg.prosody_items
        return _evaluated(
            self.cfg,
            "prosody",
            (self._run_key(), sorted(sweep.items()), n),
            out,
            lambda: prosody_report(self.cfg, run=self.rcfg.run, n_items=n, out_path=out),
        )

    def figures(self) -> dict[str, Any]:
        from moshivis_lab.figures import make_figures

        result = make_figures(self.cfg, self.figures_dir, run=self.rcfg.run, progress=self.progress)
        failed = {k: v.get("error") for k, v in result.items() if v.get("error")}
        return {"figures": sorted(result), "errors": failed}

    # ----------------------------------------------------------------------- the walk

    def _stamps(self) -> dict[str, float]:
        """Every stage stamp under the preset's root with its modification time: a stage that
        wrote or rewrote one was built (else everything it needed was already there)."""
        root = self.cfg.data_dir / self.cfg.name
        return {str(p): p.stat().st_mtime_ns for p in root.rglob(".*.done.json")}

    def run(self, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
        """Run ``stages`` in pipeline order; write timings and ``REPORT.md``; return timings."""
        import torch

        unknown = set(stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; choose from {list(STAGES)}")
        torch.set_num_threads(self.rcfg.threads)
        path = reproduce_dir(self.cfg) / "timings.json"
        timings: dict[str, Any] = read_json(path) if path.exists() else {}
        timings.setdefault("stages", {})
        start = time.time()
        for name in (s for s in STAGES if s in stages):
            self.log(f"[reproduce] {name} ...")
            before = self._stamps()
            t0 = time.time()
            getattr(self, name)()
            dt = time.time() - t0
            # figures are redrawn every time (seconds): they show the artefacts as they are now
            built = name == "figures" or self._stamps() != before
            rec = timings["stages"].get(name, {})
            rec = {
                "seconds": round(dt, 1),
                "built": bool(built),
                # the time the stage took when it was last built (kept across resumed runs)
                "build_seconds": round(dt, 1) if built else rec.get("build_seconds"),
            }
            timings["stages"][name] = rec
            state = "built" if built else "already there"
            self.log(f"[reproduce] {name}: {dt:.1f} s ({state})")
            reproduce_dir(self.cfg).mkdir(parents=True, exist_ok=True)
            write_json(path, timings)
        total = time.time() - start
        timings["this_run_seconds"] = round(total, 1)
        builds = [r.get("build_seconds") for r in timings["stages"].values()]
        timings["build_seconds_total"] = round(sum(b for b in builds if b), 1)
        timings["budget_seconds"] = BUDGET_S
        write_json(path, timings)
        if "figures" in stages:
            from moshivis_lab.figures import write_report

            fig_json = self.figures_dir / "figures.json"
            figs = read_json(fig_json) if fig_json.exists() else None
            timings["report"] = str(
                write_report(self.cfg, self.figures_dir, figures=figs, timings=timings)
            )
            write_json(path, timings)
        self.log(
            f"[reproduce] done in {total / 60:.1f} min this run; all stages built in "
            f"{timings['build_seconds_total'] / 60:.1f} min (budget {BUDGET_S / 60:.0f} min)"
        )
        return timings


def reproduce(
    cfg: LabConfig,
    rcfg: ReproduceConfig | None = None,
    *,
    figures_dir: str | Path | None = None,
    stages: tuple[str, ...] = STAGES,
    progress: bool = True,
    log: Callable[[str], Any] = print,
    rebuild_bases: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; see the module docstring."""
    r = Reproduction(
        cfg, rcfg, figures_dir=figures_dir, progress=progress, log=log, rebuild_bases=rebuild_bases
    )
    return r.run(stages)
