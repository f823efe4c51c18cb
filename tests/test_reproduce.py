"""``make reproduce``: every stage runs once, a second run skips them all, timings are kept."""

from __future__ import annotations

import shutil

import pytest

from moshivis_lab.reproduce import STAGES, ReproduceConfig, reproduce, reproduce_dir
from moshivis_lab.train.ablate import GRID, AblateConfig, variants


def test_reproduce_config_validates() -> None:
    assert ReproduceConfig.for_preset("smoke").threads == 1
    assert ReproduceConfig.for_preset("tiny") == ReproduceConfig.tiny()
    with pytest.raises(ValueError, match="ablate"):
        ReproduceConfig(ablate="huge")
    with pytest.raises(ValueError, match="speech_dialogues"):
        ReproduceConfig(speech_dialogues=0)


def test_sweep_reuses_the_grid_default_variant() -> None:
    from moshivis_lab.config import XAConfig
    from moshivis_lab.train.ablate import INIT_SWEEP

    xa = XAConfig(gate_bias=0.0, out_proj_init="zero")  # the tiny preset's init
    vs = variants(AblateConfig.reduced(), xa, default_p_audio=0.1)
    trained = [v for v in vs if not v.get("same_as")]
    # 4 grid variants, p_audio 0 and 1, Kyutai's init
    assert len(trained) == len(GRID) + 3
    assert [v["name"] for v in trained if v["sweep"] == "init"] == [INIT_SWEEP[0][0]]
    kyutai = next(v for v in trained if v["sweep"] == "init")["xa"]
    assert (kyutai.gate_bias, kyutai.out_proj_init) == (-4.0, "default")
    twin = [v for v in vs if v.get("same_as")]
    assert [(v["sweep"], v["p_audio"]) for v in twin] == [("p_audio", 0.1), ("init", None)]
    assert all("(default)" in v["same_as"] for v in twin)
    # without the grid the default point is trained like any other
    alone = variants(AblateConfig(grid=False, p_audio=(0.1,), init=()), xa, default_p_audio=0.1)
    assert len(alone) == 1 and not alone[0].get("same_as")
    with pytest.raises(ValueError, match="init"):
        AblateConfig(init=("bias 7",))


def test_unknown_stage_is_refused(smoke_world) -> None:
    with pytest.raises(ValueError, match="unknown stages"):
        reproduce(smoke_world, stages=("data", "paper"), progress=False, log=lambda _m: None)


def test_reproduce_runs_then_resumes(smoke_pretrained, tmp_path) -> None:
    # a private copy: the shared smoke world is read-only for tests
    src = smoke_pretrained.data_dir / smoke_pretrained.name
    # (the built parts only: other tests may have trained runs in it with their own settings)
    later = ("adapters", "ablations", "interp", "reproduce", "figures", "eval_*.json")
    shutil.copytree(src, tmp_path / "smoke", ignore=shutil.ignore_patterns(*later))
    cfg = smoke_pretrained.replace(data_dir=tmp_path)
    stages = tuple(s for s in STAGES if s != "figures")
    lines: list[str] = []
    t1 = reproduce(cfg, stages=stages, progress=False, log=lines.append)
    built = {k for k, v in t1["stages"].items() if v["built"]}
    # data, encoder and speech LM came with the copy (no bases are shipped for smoke); everything
    # after them is built now, including the linear probes of the copied encoder's tokens
    assert built == set(stages) - {"bases", "data", "vision", "speech_lm"}
    assert "vision_probes" in built
    root = tmp_path / "smoke"
    for rel in (
        "speech_lm/eval_val.json",
        "vision/probes.json",
        "adapters/main/eval.json",
        "ablations/ablations.json",
        "ablations/ablations.md",
        "interp/report.json",
        "interp/prosody.json",
        "reproduce/timings.json",
    ):
        assert (root / rel).stat().st_size > 0, rel
    assert all(v["build_seconds"] is not None for k, v in t1["stages"].items() if k in built)
    assert any("done in" in m for m in lines)

    t2 = reproduce(cfg, stages=stages, progress=False, log=lambda _m: None)
    assert not any(v["built"] for v in t2["stages"].values())
    assert t2["this_run_seconds"] < 30
    # the build times of the first run are kept for the report
    for k in built:
        assert t2["stages"][k]["build_seconds"] == t1["stages"][k]["build_seconds"]
    assert (reproduce_dir(cfg) / "timings.json").exists()
