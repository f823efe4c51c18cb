"""`make bench-gpu`: the released shape on one CUDA GPU (random weights: cost does not depend on
them), in one script of at most ~8 minutes, written as JSON and markdown.

- ``streaming``: one 80 ms step of MoshiVis at the moshika-vis shape (32 layers at 4096 + the
  depformer, bf16, batch 1) without and with vision (the image's K/V computed once and cached),
  beside the paper's ~48 -> ~55 ms per step.
- ``training``: adapter training (the LM frozen, the adapters in fp32, bf16 autocast) at batch 1
  on 60 s (750 frames): step time and peak memory, then the largest batch that fits (doubling).

On CPU (the test suite) it runs the same code at a reduced layer count, in float32.

    python benchmarks/gpu.py                        # the real shape (make bench-gpu)
    python benchmarks/gpu.py --layers 2 --depformer-layers 1 --seq 16 --steps 3   # CPU smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import scaled, stats  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
PAPER_MS = {"without_vision": 48.0, "with_vision": 55.0}  # MoshiVis paper, per streaming step


def build(
    layers: int | None, depformer_layers: int | None, device: torch.device, dtype: torch.dtype
) -> Any:
    """MoshiVis at the moshika-vis shape (fewer layers if asked), random, on ``device``."""
    from moshivis_lab.config import MoshiVisConfig
    from moshivis_lab.model.moshivis import MoshiVis

    cfg = MoshiVisConfig.moshika_vis()
    lm = cfg.lm
    if layers is not None:
        lm = dataclasses.replace(lm, num_layers=layers)
    if depformer_layers is not None:
        lm = dataclasses.replace(lm, depformer_num_layers=depformer_layers)
    cfg = dataclasses.replace(cfg, lm=lm, xa=dataclasses.replace(cfg.xa, xa_start=0))
    # Built on the meta device, then given cheap random values in place: the lab's own init
    # (truncated normals over 8 B weights) would cost more than the benchmark.
    with torch.device("meta"):
        model = MoshiVis(cfg)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".alpha") or "norm" in name:
                p.fill_(1.0)
            else:
                p.uniform_(-0.02, 0.02, generator=gen)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def streaming(model: Any, steps: int, warmup: int, image_tokens: int = 1024) -> dict[str, Any]:
    """Per-step time of ``model.step`` at batch 1 without and with a cached image K/V."""
    device, dtype = model.device, model.dtype
    lm = model.cfg.lm
    model.eval()
    image = torch.randn(1, image_tokens, model.cfg.xa.image_dim, device=device, dtype=dtype)
    out: dict[str, Any] = {}
    with torch.inference_mode():
        kv = model.encode_image(image)
        for name, use in (("without_vision", None), ("with_vision", kv)):
            ts = []
            with model.streaming(1, seed=0):
                for i in range(warmup + steps):
                    user = torch.randint(0, lm.card, (1, lm.n_q - lm.dep_q), device=device)
                    _sync(device)
                    t0 = time.perf_counter()
                    if use is None:
                        model.step(user)
                    else:
                        model.step(user, use)
                    _sync(device)
                    if i >= warmup:
                        ts.append(time.perf_counter() - t0)
            out[name] = {k: round(v, 3) for k, v in scaled(stats(ts), 1000.0).items()}
    out["overhead_ratio"] = round(out["with_vision"]["median"] / out["without_vision"]["median"], 3)
    out["paper_ms"] = PAPER_MS
    return out


def _train_step(
    model: Any, codes: torch.Tensor, image: torch.Tensor, opt: Any, autocast: bool
) -> None:
    ctx = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if autocast
        else torch.autocast("cpu", enabled=False)
    )
    with ctx:
        out = model(codes, image_tokens=image)
        loss = model.loss(codes, out)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def training(model: Any, seq: int, max_batch: int, image_tokens: int = 1024) -> dict[str, Any]:
    """Adapter training at batch 1 (time, peak memory), then doubling the batch until it fails."""
    from moshivis_lab.model.moshivis import adapter_parameters, freeze_for_adapters

    device = model.device
    cuda = device.type == "cuda"
    freeze_for_adapters(model)
    for p in adapter_parameters(model):
        p.data = p.data.float()  # fp32 master weights for what trains
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    lm = model.cfg.lm
    rows: list[dict[str, Any]] = []
    b = 1
    while b <= max_batch:
        codes = torch.randint(0, lm.card, (b, lm.num_codebooks, seq), device=device)
        codes[:, 0] = torch.randint(0, lm.text_card, (b, seq), device=device)
        image = torch.randn(
            b, image_tokens, model.cfg.xa.image_dim, device=device, dtype=model.dtype
        )
        try:
            if cuda:
                torch.cuda.empty_cache()
            _train_step(model, codes, image, opt, cuda)  # optimizer states exist after this
            _sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            _train_step(model, codes, image, opt, cuda)
            _sync(device)
            row = {"batch": b, "seq": seq, "step_s": round(time.perf_counter() - t0, 3)}
            if cuda:
                row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            rows.append(row)
        except torch.cuda.OutOfMemoryError:
            rows.append({"batch": b, "seq": seq, "step_s": None, "peak_gib": "OOM"})
            break
        b *= 2
    fits = [r["batch"] for r in rows if r["step_s"] is not None]
    return {
        "rows": rows,
        "largest_batch_fitting": max(fits) if fits else 0,
        "tried_up_to": max_batch,
    }


def markdown(res: dict[str, Any]) -> str:
    """The results as a short markdown report."""
    s, t = res["streaming"], res["training"]
    lines = [
        f"# bench-gpu · {res['device']} · {res['shape']}",
        "",
        "| streaming step (batch 1) | median ms | p25-p75 | paper |",
        "|---|---:|---:|---:|",
    ]
    for name in ("without_vision", "with_vision"):
        st = s[name]
        lines.append(
            f"| {name.replace('_', ' ')} | {st['median']} | {st['q1']}-{st['q3']} | ~{PAPER_MS[name]:.0f} |"
        )
    lines += [
        "",
        f"vision overhead: x{s['overhead_ratio']}",
        "",
        "| training batch | seq | step s | peak GiB |",
        "|---:|---:|---:|---:|",
    ]
    for r in t["rows"]:
        lines.append(f"| {r['batch']} | {r['seq']} | {r['step_s']} | {r.get('peak_gib', '-')} |")
    lines += [
        "",
        f"largest batch that fits: {t['largest_batch_fitting']} (tried up to {t['tried_up_to']})",
        "",
    ]
    return "\n".join(lines)


def run(
    layers: int | None = None,
    depformer_layers: int | None = None,
    seq: int = 750,
    steps: int = 50,
    warmup: int = 10,
    max_batch: int = 64,
    device: str | None = None,
) -> dict[str, Any]:
    """Both groups; on CPU in float32 (what the test suite runs at a reduced layer count)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = build(layers, depformer_layers, dev, dtype)
    lm = model.cfg.lm
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "shape": f"{lm.num_layers} layers x {lm.dim} + depformer {lm.depformer_num_layers} x {lm.depformer_dim}",
        "build_s": round(time.perf_counter() - t0, 1),
    }
    res["streaming"] = streaming(model, steps, warmup)
    res["training"] = training(model, seq, max_batch)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=None, help="temporal layers (default: 32)")
    parser.add_argument("--depformer-layers", type=int, default=None, help="(default: 6)")
    parser.add_argument("--seq", type=int, default=750, help="training frames (750 = 60 s)")
    parser.add_argument("--steps", type=int, default=50, help="timed streaming steps")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    res = run(
        args.layers,
        args.depformer_layers,
        args.seq,
        args.steps,
        min(10, args.steps),
        args.max_batch,
        args.device,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "gpu.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
