"""Adapter-training cost: throughput (tokens/s) and memory, on CPU and (when there is one) a GPU.

- ``preset``: the tiny preset's own training step (``TrainConfig.tiny``: 16 mixed samples, speech
  and speechless rows forwarded apart, AdamW on the adapters of the pretrained tiny LM), in a
  fresh process so that its peak resident memory is its own. Tokens = model steps (80 ms
  frames) of every sample of the batch, padding included.
- ``scaling``: the same frozen LM + adapters (random weights, all-speech synthetic grids) with
  one of image tokens (16 to 1024), context length or batch varied: step time, tokens/s and the
  bytes autograd saves for backward (counted exactly, as in ``moshivis_lab.train.memory``).
- ``real_recipe``: the meta-device estimate of the released recipe (frozen Moshi 7B in bf16 +
  206M fp32 adapters with AdamW, bf16 autocast) for a few context lengths, with and without
  activation checkpointing, and the largest batch that fits 80 GiB.
- ``gpu``: with CUDA, bf16 autocast: the tiny step's tokens/s and peak memory by batch up to the
  largest that fits, and the real recipe's measured peak next to its estimate (with and without
  checkpointing). Skipped without CUDA.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RssPeak, interleaved, peak_rss_mb, scaled, stats

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


# ---------------------------------------------------------------------- the tiny preset's step


def _preset_parts(cfg: Any, tcfg: Any = None) -> dict[str, Any]:
    """Model (pretrained LM when built), image table and batch source of the tiny preset."""
    from moshivis_lab.config import LMConfig, XAConfig
    from moshivis_lab.model.moshivis import MoshiVis
    from moshivis_lab.train.adapters import TrainConfig, freeze_and_unfreeze

    tcfg = tcfg or TrainConfig.tiny()
    notes = []
    try:
        from moshivis_lab.train.pretrain import load_speech_lm

        lm = load_speech_lm(cfg)
    except Exception as e:  # noqa: BLE001 - cost is the same with random weights
        from moshivis_lab.model import MoshiLM

        lm = MoshiLM(LMConfig.tiny())
        notes.append(f"random LM ({type(e).__name__}: {e})"[:200])
    table_path = cfg.data_dir / cfg.name / "image_tokens" / "train.safetensors"
    if table_path.exists():
        from safetensors.torch import load_file

        table = load_file(str(table_path))["tokens"].float()
    else:
        from moshivis_lab.vision import VisionConfig

        vc = VisionConfig.tiny()
        table = torch.randn(64, vc.num_tokens, vc.hidden_size)
        notes.append("random image tokens (no cached table)")
    torch.manual_seed(0)
    model = MoshiVis.from_lm(lm, XAConfig.tiny(lm.cfg, int(table.shape[-1])))
    freeze_and_unfreeze(model, tcfg, log=lambda *_: None)
    try:
        from moshivis_lab.train.mix import MixedData, batch_for_step

        data = MixedData(cfg, "train", tcfg.mix)

        def batch(step: int) -> Any:
            b = batch_for_step(data, tcfg.batch_size, tcfg.seed, step)
            b.image_index = b.image_index % table.shape[0]
            return b

        batch(0)
    except Exception as e:  # noqa: BLE001
        notes.append(f"synthetic batches ({type(e).__name__}: {e})"[:200])
        batch = _synthetic_batches(lm.cfg, tcfg.batch_size, 128, table.shape[0])
    return {"model": model, "table": table, "batch": batch, "tcfg": tcfg, "notes": notes}


def _synthetic_batches(lm_cfg: Any, b: int, t: int, n_images: int) -> Any:
    from moshivis_lab.train.mix import Batch

    def batch(step: int) -> Any:
        g = torch.Generator().manual_seed(step)
        codes = torch.randint(0, lm_cfg.card, (b, lm_cfg.num_codebooks, t), generator=g)
        codes[:, 0] = torch.randint(0, lm_cfg.text_card, (b, t), generator=g)
        return Batch(
            codes,
            torch.ones(b, t),
            torch.ones(b, t),
            torch.randint(0, n_images, (b,), generator=g),
            torch.ones(b, dtype=torch.bool),
        )

    return batch


def preset_step(cfg: Any, steps: int = 6, warm: int = 2, tcfg: Any = None) -> dict[str, Any]:
    """tokens/s of the preset's training step (CPU), as ``train_adapters`` runs it
    (``tcfg``: ``TrainConfig.tiny()`` by default)."""
    from moshivis_lab.train.adapters import batch_loss

    p = _preset_parts(cfg, tcfg)
    model, table, tcfg = p["model"], p["table"], p["tcfg"]
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
    model.train()
    gc.collect()
    times, tokens, real = [], [], []
    with RssPeak() as rss:
        for i in range(warm + steps):
            b = p["batch"](i)
            t0 = time.perf_counter()
            parts = batch_loss(model, b, table)
            parts["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            if i >= warm:
                times.append(dt)
                tokens.append(b.codes.shape[0] * b.codes.shape[2])
                used = (b.codes != -1).any(dim=1)
                real.append(int(used.sum()))
    return {
        "batch": tcfg.batch_size,
        "step_ms": scaled(stats(times), 1000),
        "tokens_per_s": stats([n / t for n, t in zip(tokens, times, strict=True)]),
        "non_padding_tokens_per_s": stats([n / t for n, t in zip(real, times, strict=True)]),
        "tokens_per_step": stats(tokens),
        "rss_before_steps_mib": round(rss.start_mib, 1),
        "rss_peak_during_steps_mib": round(rss.peak_mib, 1),
        "rss_increase_during_steps_mib": round(rss.increase_mib, 1),
        "process_peak_rss_mib": round(peak_rss_mb(), 1),  # data loading included
        "trainable_params": sum(q.numel() for q in params),
        "notes": p["notes"],
    }


def preset_subprocess(preset: str, threads: int, quick: bool, timeout: float = 1200) -> dict:
    """``preset_step`` in a fresh process (its peak RSS is then the training's own)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "preset.json"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.training",
            "--worker",
            "preset",
            "--preset",
            preset,
            "--threads",
            str(threads),
            "--out",
            str(out),
        ]
        if quick:
            cmd.append("--quick")
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"skipped": f"took over {timeout:.0f} s"}
        if p.returncode != 0 or not out.exists():
            return {"failed": (p.stderr or p.stdout)[-2000:]}
        return json.loads(out.read_text())


# ---------------------------------------------------------------------- scaling sweeps


def _sweep_model(image_dim: int = 160) -> Any:
    from moshivis_lab.config import LMConfig, MoshiVisConfig
    from moshivis_lab.model.moshivis import MoshiVis, freeze_for_adapters

    torch.manual_seed(0)
    model = MoshiVis(MoshiVisConfig.tiny(LMConfig.tiny(), image_dim=image_dim))
    freeze_for_adapters(model)
    return model.train()


def _one_config(model: Any, b: int, t: int, n: int, repeats: int) -> dict[str, Any]:
    from moshivis_lab.train.memory import measured_saved_bytes

    cfg = model.cfg.lm
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.card, (b, cfg.num_codebooks, t), generator=g)
    codes[:, 0] = torch.randint(0, cfg.text_card, (b, t), generator=g)
    img = torch.randn(b, n, model.cfg.xa.image_dim, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        out = model(codes, image_tokens=img)
        model.loss(codes, out)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ts = interleaved({"s": step}, repeats)["s"]
    saved = measured_saved_bytes(model, codes, img)
    model.zero_grad(set_to_none=True)
    st = stats(ts)
    return {
        "batch": b,
        "seq": t,
        "image_tokens": n,
        "step_ms": round(1000 * st["median"], 2),
        "step_ms_range": [round(1000 * st["min"], 2), round(1000 * st["max"], 2)],
        "tokens_per_s": round(b * t / st["median"], 1),
        "saved_activations_mib": round(saved / MIB, 2),
        "saved_kib_per_token": round(saved / (b * t) / 1024, 2),
    }


def scaling(quick: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Cost of a tiny adapter-training step as image tokens, context length and batch grow."""
    model = _sweep_model()
    r = 1 if quick else 3
    if quick:
        grid = {"image_tokens": [16, 64], "seq": [16, 32], "batch": [1, 2]}
        base_b, base_t = 2, 16
    else:
        grid = {
            "image_tokens": [16, 64, 256, 1024],
            "seq": [32, 64, 128, 256, 512],
            "batch": [1, 2, 4, 8, 16, 32],
        }
        base_b, base_t = 8, 128
    out: dict[str, list[dict[str, Any]]] = {}
    out["image_tokens"] = [_one_config(model, base_b, base_t, n, r) for n in grid["image_tokens"]]
    out["seq"] = [_one_config(model, base_b, t, 81, r) for t in grid["seq"]]
    out["batch"] = [_one_config(model, b, base_t, 81, r) for b in grid["batch"]]
    return out


# ---------------------------------------------------------------------- the real recipe


def real_recipe(quick: bool = False) -> dict[str, Any]:
    """Meta-device memory estimates of the released recipe on one 80 GiB GPU."""
    from moshivis_lab.train.memory import estimate_training_memory, largest_batch

    seqs = [750] if quick else [375, 750, 1500, 3000]
    out: dict[str, Any] = {"budget_gib": 80, "rows": []}
    for seq in seqs:
        for ckpt in (False, True):
            one = estimate_training_memory(seq=seq, batch=1, checkpointing=ckpt)
            if quick:
                best, est = 1, one
            else:
                best, est = largest_batch(seq=seq, budget_gib=80, checkpointing=ckpt)
            out["rows"].append(
                {
                    "seq": seq,
                    "checkpointing": ckpt,
                    "batch1_total_gib": round(one.total_gib, 2),
                    "static_gib": round(one.static / 2**30, 2),
                    "activation_mib_per_token": round(one.activation_bytes_per_token / MIB, 3),
                    "largest_batch_80gib": best,
                    "largest_batch_total_gib": round(est.total_gib, 2) if est else None,
                }
            )
    one = estimate_training_memory(seq=750)
    two = estimate_training_memory(seq=750, batch=2)
    per_sample = two.activations - one.activations
    out["batch1_seq750"] = one.as_dict()
    out["seq750_activation_gib_per_sample"] = round(per_sample / 2**30, 3)
    out["seq750_activation_gib_fixed"] = round((one.activations - per_sample) / 2**30, 3)
    return out


# ---------------------------------------------------------------------- GPU (when there is one)


def gpu(quick: bool = False) -> dict[str, Any]:
    """bf16 autocast on CUDA: tiny throughput/peak memory by batch, largest batch, real recipe."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine (the code path runs where there is one)"}
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    try:
        out["tiny"] = _gpu_tiny(quick)
    except Exception as e:  # noqa: BLE001 - report, do not lose the other results
        out["tiny"] = {"failed": f"{type(e).__name__}: {e}"[:1000]}
    try:
        out["real_recipe"] = _gpu_real(quick)
    except Exception as e:  # noqa: BLE001
        out["real_recipe"] = {"failed": f"{type(e).__name__}: {e}"[:1000]}
    return out


def _gpu_step(model: Any, codes: torch.Tensor, img: torch.Tensor, opt: Any) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(codes, image_tokens=img)
        loss = model.loss(codes, out)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _gpu_tiny(quick: bool) -> dict[str, Any]:
    dev = torch.device("cuda")
    model = _sweep_model().to(dev)
    cfg = model.cfg.lm
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    t = 128
    rows, largest = [], 0
    b = 8
    limit = 64 if quick else 8192
    while b <= limit:
        codes = torch.randint(0, cfg.card, (b, cfg.num_codebooks, t), device=dev)
        codes[:, 0] = torch.randint(0, cfg.text_card, (b, t), device=dev)
        img = torch.randn(b, 81, model.cfg.xa.image_dim, device=dev)
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            _gpu_step(model, codes, img, opt)
            torch.cuda.synchronize()
            ts = []
            for _ in range(2 if quick else 5):
                t0 = time.perf_counter()
                _gpu_step(model, codes, img, opt)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
        except torch.cuda.OutOfMemoryError:
            break
        st = stats(ts)
        rows.append(
            {
                "batch": b,
                "seq": t,
                "step_ms": round(1000 * st["median"], 2),
                "tokens_per_s": round(b * t / st["median"]),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            }
        )
        largest = b
        b *= 2
    return {"rows": rows, "largest_batch_fitting": largest, "capped_at": limit}


def _gpu_real(quick: bool) -> dict[str, Any]:
    from moshivis_lab.config import MoshiVisConfig
    from moshivis_lab.model.moshivis import MoshiVis, adapter_parameters, freeze_for_adapters
    from moshivis_lab.train.memory import checkpoint_temporal_layers, estimate_training_memory

    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    if total < 60:
        return {"skipped": f"{total:.0f} GiB GPU; the real recipe needs ~30+ GiB at batch 1"}
    cfg = MoshiVisConfig.moshika_vis()
    dev = torch.device("cuda")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with dev:
            model = MoshiVis(cfg)
    finally:
        torch.set_default_dtype(before)
    freeze_for_adapters(model)
    for p in adapter_parameters(model):  # fp32 master weights for the trained part
        p.data = p.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    lm = cfg.lm
    rows = []
    seq = 250 if quick else 750
    for ckpt in (False, True):
        for b in (1,) if quick else (1, 2, 4):
            codes = torch.randint(0, lm.card, (b, lm.num_codebooks, seq), device=dev)
            codes[:, 0] = torch.randint(0, lm.text_card, (b, seq), device=dev)
            img = torch.randn(b, 1024, cfg.xa.image_dim, device=dev, dtype=torch.bfloat16)
            est = estimate_training_memory(cfg, batch=b, seq=seq, checkpointing=ckpt)
            row: dict[str, Any] = {
                "batch": b,
                "seq": seq,
                "checkpointing": ckpt,
                "estimate_gib": round(est.total_gib, 2),
                "estimate_without_overhead_gib": round((est.total - est.overhead) / 2**30, 2),
            }
            try:
                torch.cuda.empty_cache()
                with checkpoint_temporal_layers(model, enabled=ckpt):
                    _gpu_step(model, codes, img, opt)  # optimizer states now exist
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    _gpu_step(model, codes, img, opt)
                    torch.cuda.synchronize()
                row["step_s"] = round(time.perf_counter() - t0, 3)
                row["tokens_per_s"] = round(b * seq / row["step_s"], 1)
                row["measured_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            except torch.cuda.OutOfMemoryError:
                row["measured_peak_gib"] = "OOM"
            rows.append(row)
    return {"rows": rows, "gpu_total_gib": round(total, 1)}


# ---------------------------------------------------------------------- entry points


def bench(cfg: Any, quick: bool = False, threads: int = 2) -> dict[str, Any]:
    """All of the above (``quick``: smallest sizes)."""
    return {
        "preset": preset_subprocess(cfg.name, threads, quick),
        "scaling": scaling(quick),
        "real_recipe": real_recipe(quick),
        "gpu": gpu(quick),
    }


def main() -> None:
    """``--worker preset``: ``preset_step`` written as JSON to ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worker", choices=["preset"], required=True)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from moshivis_lab.config import preset

    cfg = preset(args.preset)
    res = preset_step(cfg, steps=1 if args.quick else 6, warm=1 if args.quick else 2)
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
