"""The benchmark code paths at smoke sizes (``--quick``): structure and finite numbers only.

No timing is asserted here (timings belong to ``make bench``); the memory estimate's numbers,
which are exact counts, are.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi is imported
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def finite_stats(st: dict, positive: bool = True) -> None:
    assert {"median", "q1", "q3", "min", "max", "n"} <= set(st), st
    vals = [st[k] for k in ("min", "q1", "median", "q3", "max")]
    assert all(math.isfinite(v) for v in vals), st
    assert vals == sorted(vals), st
    if positive:
        assert st["min"] > 0, st


def test_stats_quartiles_and_interleaving_order() -> None:
    st = common.stats([5, 1, 3, 2, 4])
    assert (st["min"], st["q1"], st["median"], st["q3"], st["max"]) == (1, 2, 3, 4, 5)
    assert st["n"] == 5
    calls: list[str] = []
    t = common.interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b") or 0.5}, 3, warmup=1
    )
    assert calls == ["a", "b"] * 4  # warm-up, then the cases in turn within each repeat
    assert t["b"] == [0.5, 0.5, 0.5] and len(t["a"]) == 3
    assert common.ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError):
        common.stats([])


def test_vision_overhead_quick() -> None:
    from benchmarks import vision_overhead

    res = vision_overhead.bench(quick=True)
    tiny = res["tiny"]
    for mode in ("base", "cached", "cached_gates_read", "recompute"):
        finite_stats(tiny["step_ms"][mode])
    for k in ("ratio_cached", "ratio_cached_gates_read", "ratio_recompute"):
        finite_stats(tiny[k])
    finite_stats(tiny["adapter_us_per_layer"])
    prof = tiny["profile"]
    # Counted calls (not times): the adapters add work, and less than a third of the step's.
    assert 1.0 < prof["aten_calls_ratio"] < 1.33
    assert prof["base"]["top_self_cpu_ms_per_step"]
    assert tiny["shape"]["xa_layers"] == 6 and tiny["shape"]["image_tokens"] == 81
    real = res["real_layer"]
    fills = [k for k in real if k.startswith("fill_")]
    assert fills
    for k in fills:
        finite_stats(real[k]["ratio_cached"])
        finite_stats(real[k]["ratio_recompute"])
        assert real[k]["bytes_model_ratio"] > 1
    full = res["bytes_model_full_7b"]
    # Reading the image K/V once is cheaper than in every layer; a filled cache dilutes both.
    assert full["kv_per_layer"]["ratio"] > full["kv_once"]["ratio"] > 1
    assert full["kv_once_fill_3000"]["ratio"] < full["kv_once"]["ratio"]


def test_bandwidth_model_at_the_real_shape() -> None:
    from benchmarks.vision_overhead import layer_bytes_ratio

    # One Moshi 7B layer (FFN 11264) with the released adapter over 1024 tokens, empty cache:
    # Q + out (2 d^2) + gate (d^2 / 4) + K/V (2 N d) over 4 d^2 + 3 d h.
    r = layer_bytes_ratio(4096, 11264, 1024, 1)
    assert 1.2 < r < 1.25


def test_vs_moshi_quick() -> None:
    from benchmarks import vs_moshi

    why = vs_moshi.moshi_available()
    if why:
        pytest.skip(why)
    res = vs_moshi.compare(batch=2, seq=8, repeats=1, stream_steps=2, stream_warm=1)
    for k in ("ours", "theirs"):
        finite_stats(res["train_step_ms"][k])
        finite_stats(res["stream_step_ms"][k])
    finite_stats(res["train_ratio_ours_over_theirs"])
    finite_stats(res["stream_ratio_ours_over_theirs"])
    assert res["config"]["dim"] == 256 and not res["config"]["compiled"]


def test_vs_moshi_pair_holds_the_same_weights() -> None:
    from benchmarks import vs_moshi

    if vs_moshi.moshi_available():
        pytest.skip("moshi not importable")
    cfg, theirs, ours = vs_moshi.build_pair()
    a, b = theirs.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_realtime_quick(smoke_world) -> None:
    from benchmarks import realtime

    res = realtime.bench(smoke_world, quick=True)
    assert "skipped" not in res, res
    for k in ("with_image", "no_image"):
        finite_stats(res["x_realtime"][k])
    for k in ("codec_encode", "lm_step", "codec_decode", "image_session_start"):
        finite_stats(res["parts_ms"][k])
    assert res["audio_seconds"] > 0 and res["frames"] > 0


def test_training_scaling_quick() -> None:
    from benchmarks import training

    res = training.scaling(quick=True)
    assert set(res) == {"image_tokens", "seq", "batch"}
    for rows in res.values():
        assert len(rows) == 2
        for r in rows:
            assert r["tokens_per_s"] > 0 and r["saved_activations_mib"] > 0
    # Saved activations grow with every axis (exact byte counts, not timings).
    for axis in res.values():
        assert axis[1]["saved_activations_mib"] > axis[0]["saved_activations_mib"]
    gpu = training.gpu(quick=True)
    if not torch.cuda.is_available():
        assert "skipped" in gpu


def test_training_preset_step_on_smoke(smoke_pretrained) -> None:
    from benchmarks import training
    from moshivis_lab.train.adapters import TrainConfig

    res = training.preset_step(smoke_pretrained, steps=1, warm=0, tcfg=TrainConfig.smoke())
    finite_stats(res["tokens_per_s"])
    finite_stats(res["step_ms"])
    assert res["trainable_params"] > 0 and res["rss_peak_during_steps_mib"] > 0
    assert res["rss_increase_during_steps_mib"] >= 0
    assert res["batch"] == TrainConfig.smoke().batch_size


# ---------------------------------------------------------------------- the memory estimate


def test_memory_estimate_of_the_real_recipe() -> None:
    from moshivis_lab.train.memory import estimate_training_memory

    est = estimate_training_memory(batch=1, seq=64)
    assert est.trainable_params == 206_184_448  # the released moshika-vis adapters
    assert 7.6e9 < est.frozen_params < 7.8e9
    assert est.frozen_weights == 2 * est.frozen_params  # bf16
    assert est.optimizer == 8 * est.trainable_params and est.gradients == 4 * est.trainable_params
    ckpt = estimate_training_memory(batch=1, seq=64, checkpointing=True)
    assert ckpt.activations < est.activations and ckpt.static == est.static
    # Affine in the batch: per-sample activations plus a fixed part (the depformer's per-step
    # frozen weights, stacked for one batched matmul and kept for backward).
    two = estimate_training_memory(batch=2, seq=64)
    three = estimate_training_memory(batch=3, seq=64)
    slope = two.activations - est.activations
    assert slope > 0 and three.activations - two.activations == pytest.approx(slope, rel=0.01)
    assert est.details["head"] > 0 and sum(v for k, v in est.details.items() if "layer" in k) > 0
    d = est.as_dict()
    assert d["total_gib"] > d["static_gib"] > 0 and json.dumps(d)


def test_memory_meta_estimate_matches_a_real_forward() -> None:
    from moshivis_lab.config import LMConfig, MoshiVisConfig
    from moshivis_lab.model.moshivis import MoshiVis, freeze_for_adapters
    from moshivis_lab.train.memory import _measure, measured_saved_bytes

    cfg = MoshiVisConfig.tiny(LMConfig.tiny(), image_dim=32)
    torch.manual_seed(0)
    model = MoshiVis(cfg)
    freeze_for_adapters(model)
    model.train()
    codes = torch.randint(0, 256, (2, 17, 24))
    codes[:, 0] = torch.randint(0, 1000, (2, 24))
    real = measured_saved_bytes(model, codes, torch.randn(2, 9, 32))
    meta = _measure(cfg, 2, 24, 9, torch.float32)["total"]
    assert meta == pytest.approx(real, rel=0.01)


def test_checkpointing_keeps_the_gradients() -> None:
    from moshivis_lab.config import LMConfig, MoshiVisConfig
    from moshivis_lab.model.moshivis import MoshiVis, freeze_for_adapters
    from moshivis_lab.train.memory import checkpoint_temporal_layers, measured_saved_bytes

    cfg = MoshiVisConfig.tiny(LMConfig.tiny(), image_dim=32)
    torch.manual_seed(0)
    model = MoshiVis(cfg)
    freeze_for_adapters(model)
    model.train()
    codes = torch.randint(0, 256, (2, 17, 16))
    codes[:, 0] = torch.randint(0, 1000, (2, 16))
    img = torch.randn(2, 9, 32)

    def grads() -> list[torch.Tensor]:
        out = model(codes, image_tokens=img)
        model.loss(codes, out)["loss"].backward()
        g = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        return g

    plain = grads()
    with checkpoint_temporal_layers(model):
        ckpt = grads()
        saved_ckpt = measured_saved_bytes(model, codes, img)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt, strict=True))
    assert saved_ckpt < measured_saved_bytes(model, codes, img)
    assert "forward" not in vars(model.lm.transformer.layers[0])  # restored


def test_largest_batch_fits_its_budget() -> None:
    from moshivis_lab.train.memory import largest_batch

    b, est = largest_batch(seq=375, budget_gib=40)
    assert b >= 1 and est is not None and est.fits(40) and est.batch == b
    b2, _ = largest_batch(seq=375, budget_gib=40, checkpointing=True)
    assert b2 >= b
    assert largest_batch(seq=375, budget_gib=10) == (0, None)  # the weights alone need more


# ---------------------------------------------------------------------- the entry point


def test_run_writes_json_and_markdown(tmp_path) -> None:
    from benchmarks import run

    res = run.main(["--quick", "--only", "world", "--out", str(tmp_path), "--threads", "1"])
    assert "world" in res and res["machine"]["quick"]
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["world"]["scenes_per_s"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "## Headline" in md and "| world | scenes_per_s |" in md
    with pytest.raises(SystemExit):
        run.main(["--only", "nope", "--out", str(tmp_path)])


def test_markdown_renders_stats_and_tables() -> None:
    from benchmarks import run

    st = common.stats([1.0, 1.1, 1.2])
    res = {
        "machine": {"cpus": 2},
        "vision_overhead": {"tiny": {"ratio_cached": st}},
        "training": {"scaling": {"batch": [{"batch": 1, "tokens_per_s": 10.0}]}},
        "broken": {"failed": "x", "traceback": "long"},
    }
    md = run.to_markdown(res)
    assert "vision overhead, tiny, K/V cached | 1.100 [IQR" in md
    assert "**scaling.batch**" in md and "| 1 | 10.0 |" in md
    assert "long" not in md


def test_bench_gpu_runs_on_cpu_at_a_reduced_layer_count(tmp_path) -> None:
    """`make bench-gpu`'s code at the real widths, one layer each, in float32 on the CPU."""
    from benchmarks import gpu

    res = gpu.run(layers=1, depformer_layers=1, seq=8, steps=3, warmup=1, max_batch=1, device="cpu")
    assert res["shape"] == "1 layers x 4096 + depformer 1 x 1024" and res["dtype"] == "float32"
    s = res["streaming"]
    for name in ("without_vision", "with_vision"):
        finite_stats(s[name])
        assert s[name]["n"] == 3
    assert s["overhead_ratio"] > 0 and s["paper_ms"] == gpu.PAPER_MS
    t = res["training"]
    assert t["largest_batch_fitting"] == 1 and t["rows"][0]["step_s"] > 0
    md = gpu.markdown(res)
    assert "with vision" in md and "largest batch that fits: 1" in md
