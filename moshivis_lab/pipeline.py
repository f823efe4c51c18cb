"""The lab's build pipeline, stage by stage; each stage is skipped when already built."""

from __future__ import annotations

import time

from moshivis_lab.artefacts import write_json
from moshivis_lab.config import LabConfig

DATA_STAGES = ("scenes", "texts", "speech", "tokenizer", "codec", "shards")


def build_data(
    cfg: LabConfig, progress: bool = True, stages: tuple[str, ...] = DATA_STAGES
) -> dict:
    """Build (or resume) the data world, the tokenizer, the codec and the token shards."""
    from moshivis_lab.audio.codecs import fit_codec_stage
    from moshivis_lab.world.generate import build_scenes, build_texts
    from moshivis_lab.world.shards import build_shards, build_tokenizer_stage
    from moshivis_lab.world.speak import build_speech

    fns = {
        "scenes": lambda: build_scenes(cfg, progress),
        "texts": lambda: build_texts(cfg, progress),
        "speech": lambda: build_speech(cfg, progress),
        "tokenizer": lambda: build_tokenizer_stage(cfg),
        "codec": lambda: fit_codec_stage(cfg, progress),
        "shards": lambda: build_shards(cfg, progress),
    }
    unknown = set(stages) - set(fns)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {DATA_STAGES}")
    t0 = time.time()
    report: dict = {"preset": cfg.name, "data_dir": str(cfg.data_dir), "stages": {}}
    for name in DATA_STAGES:
        if name in stages:
            report["stages"][name] = fns[name]()
    report["seconds"] = round(time.time() - t0, 2)
    write_json(cfg.data_dir / cfg.name / "build_report.json", report)
    return report
