"""Shared test setup: offline, deterministic, small."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and a busy machine makes thread sync costly."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def evaluate_small():
    """``evaluate_moshivis`` of a trained run at the smallest size that fills every section."""
    from moshivis_lab.train.adapters import load_trained
    from moshivis_lab.train.vis_eval import evaluate_moshivis

    def run(cfg, name: str) -> dict:
        return evaluate_moshivis(
            cfg,
            load_trained(cfg, name),
            run=name,
            splits=("test",),
            per_type=2,
            spoken_per_type=1,
            n_captions=2,
            n_speech=2,
            gate_batches=1,
            progress=False,
        )

    return run


@pytest.fixture(scope="session")
def smoke_world(tmp_path_factory: pytest.TempPathFactory):
    """One smoke world (data, tokenizer, quickly fitted codec, shards) shared by every module.

    Read it, never write into it: build per-test artefacts under ``tmp_path`` (for example with
    ``cfg.replace(...)`` or by passing an output directory).
    """
    import dataclasses

    from moshivis_lab.config import LabConfig
    from moshivis_lab.pipeline import build_data

    cfg = LabConfig.smoke(tmp_path_factory.mktemp("smoke_world"))
    codec = dataclasses.replace(
        cfg.codec, fit_seconds=40.0, kmeans_iters=4, phone_sentences=60, phone_epochs=8
    )
    cfg = cfg.replace(codec=codec)
    build_data(cfg, progress=False)
    return cfg


@pytest.fixture(scope="session")
def smoke_pretrained(smoke_world):
    """``smoke_world`` plus its smoke speech LM and smoke vision encoder (built once)."""
    from moshivis_lab.train.adapters import ensure_pretrained

    ensure_pretrained(smoke_world, progress=False)
    return smoke_world
