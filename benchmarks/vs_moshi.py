"""Ours beside Kyutai's ``moshi`` package: the same tiny config, same weights, one run, interleaved.

Training step = forward + loss + backward (``MoshiLM.loss`` on both outputs: moshi's LMModel has
no loss of its own and returns the same fields), batch 8 x 128 steps, all parameters trainable.
Streaming step = one 80 ms step at batch 1 with sampling (ours: ``MoshiLM.step``; theirs:
``LMGen.step``, the same temperatures and top-k).

Eager mode needs ``NO_TORCH_COMPILE=1`` before moshi is imported (moshi decides at import).
Compiled mode runs in a subprocess without it (``python -m benchmarks.vs_moshi --compile``):
moshi compiles its own kernels (gating, RoPE) lazily; ours compiles every transformer layer's
forward (``torch.compile(layer.forward, dynamic=True)``) for training; for streaming both our
eager step and our compiled step are timed (at batch 1 on a CPU the compiled one is slower:
guards and small graphs cost more than the fused kernels save). Compiled outputs are not bitwise
those of eager.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import interleaved, ratios, scaled, stats
from moshivis_lab.model.checkpoint import moshi_lm_kwargs

ROOT = Path(__file__).resolve().parent.parent


def build_pair(cfg: Any = None, seed: int = 0) -> tuple[Any, Any, Any]:
    """``(cfg, theirs, ours)``: moshi's LMModel and our MoshiLM holding the same weights."""
    import torch
    from moshi.models.lm import LMModel

    from moshivis_lab.config import LMConfig
    from moshivis_lab.model import MoshiLM

    cfg = cfg or LMConfig.tiny()
    torch.manual_seed(seed)
    theirs = LMModel(**moshi_lm_kwargs(cfg))
    ours = MoshiLM(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return cfg, theirs, ours


def moshi_available() -> str | None:
    """None when moshi imports, else why not."""
    try:
        import moshi.models.lm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure means: no reference here
        return f"moshi not importable: {e}"
    return None


def compare(
    *,
    batch: int = 8,
    seq: int = 128,
    repeats: int = 9,
    stream_steps: int = 40,
    stream_warm: int = 5,
    compile_models: bool = False,
) -> dict[str, Any]:
    """Training and streaming step times of ours and theirs, interleaved, with paired ratios."""
    import torch
    from moshi.models.lm import LMGen

    cfg, theirs, ours = build_pair()
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, cfg.card, (batch, cfg.num_codebooks, seq), generator=g)
    codes[:, 0] = torch.randint(0, cfg.text_card, (batch, seq), generator=g)
    user = torch.randint(0, cfg.card, (1, cfg.n_q - cfg.dep_q), generator=g)
    layers = [*ours.transformer.layers, *ours.depformer.layers]
    compiled: dict[Any, Any] = {}
    if compile_models:
        import torch._dynamo.config as dynamo_config

        # One graph per depformer codebook step (its weights are picked by a Python index).
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 32)
        compiled = {layer: torch.compile(layer.forward, dynamic=True) for layer in layers}

    def use_compiled(on: bool) -> None:
        for layer, fn in compiled.items():
            if on:
                layer.forward = fn
            else:
                layer.__dict__.pop("forward", None)

    def train_step(model: Any):
        def run() -> None:
            use_compiled(model is ours)
            model.train()
            out = model(codes)
            loss = ours.loss(codes, out)["loss"]
            loss.backward()
            model.zero_grad(set_to_none=True)
            use_compiled(False)

        return run

    def ours_stream(with_compile: bool = False):
        def run() -> float:
            use_compiled(with_compile)
            ours.eval()
            with torch.inference_mode(), ours.streaming(1, seed=0):
                for _ in range(stream_warm):
                    ours.step(user)
                t0 = time.perf_counter()
                for _ in range(stream_steps):
                    ours.step(user)
                dt = (time.perf_counter() - t0) / stream_steps
            use_compiled(False)
            return dt

        return run

    def theirs_stream() -> float:
        theirs.eval()
        gen = LMGen(theirs, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
        u = user[:, :, None]
        with torch.no_grad(), gen.streaming(1):
            for _ in range(stream_warm):
                gen.step(u)
            t0 = time.perf_counter()
            for _ in range(stream_steps):
                gen.step(u)
            return (time.perf_counter() - t0) / stream_steps

    t_compile = time.perf_counter()
    warm = 3 if compile_models else 1  # compiled: the first calls compile
    tr = interleaved({"ours": train_step(ours), "theirs": train_step(theirs)}, repeats, warm + 1)
    stream_cases = {"ours": ours_stream(), "theirs": theirs_stream}
    if compile_models:  # ours compiled as well, though eager is faster at batch 1 (see docs)
        stream_cases["ours_compiled"] = ours_stream(True)
    st = interleaved(stream_cases, repeats, warm)
    out = {
        "config": {
            "dim": cfg.dim,
            "layers": cfg.num_layers,
            "depformer": f"{cfg.depformer_dim} x {cfg.depformer_num_layers}",
            "codebooks": f"{cfg.dep_q}+{cfg.n_q - cfg.dep_q} of {cfg.card}",
            "text_card": cfg.text_card,
            "train_batch": f"{batch} x {seq}",
            "stream_positions": f"{stream_warm}..{stream_warm + stream_steps - 1}",
            "compiled": compile_models,
        },
        "train_step_ms": {k: scaled(stats(v), 1000) for k, v in tr.items()},
        "stream_step_ms": {k: scaled(stats(v), 1000) for k, v in st.items()},
        "train_ratio_ours_over_theirs": stats(ratios(tr["ours"], tr["theirs"])),
        "stream_ratio_ours_over_theirs": stats(ratios(st["ours"], st["theirs"])),
        "wall_s": time.perf_counter() - t_compile,
        "targets": "train <= 1.0, stream <= 0.5",
    }
    if compile_models:
        out["stream_ratio_ours_compiled_over_theirs"] = stats(
            ratios(st["ours_compiled"], st["theirs"])
        )
        out["note"] = (
            "train: ours with torch.compile'd layers vs moshi's compiled kernels; stream: ours "
            "eager (faster than compiled at batch 1) vs moshi compiled; ours_compiled also shown"
        )
    return out


def profile_train(top: int = 8) -> dict[str, list]:
    """Top ops (self CPU ms per training step) of ours and theirs, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    cfg, theirs, ours = build_pair()
    import torch

    codes = torch.randint(0, cfg.card, (8, cfg.num_codebooks, 128))
    codes[:, 0] = torch.randint(0, cfg.text_card, (8, 128))
    out: dict[str, list] = {}
    for name, m in (("ours", ours), ("theirs", theirs)):
        m.train()

        def step(m: Any = m) -> None:
            loss = ours.loss(codes, m(codes))["loss"]
            loss.backward()
            m.zero_grad(set_to_none=True)

        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
        out[name] = [[e.key, round(e.self_cpu_time_total / 1000, 2), e.count] for e in rows]
    return out


def bench(quick: bool = False, with_compile: bool = True, threads: int | None = None) -> dict:
    """Eager comparison here (needs NO_TORCH_COMPILE=1 before moshi loads); compiled one in a
    subprocess (skipped with ``quick`` or ``with_compile=False``)."""
    why = moshi_available()
    if why:
        return {"skipped": why}
    if os.environ.get("NO_TORCH_COMPILE") != "1":
        return {"skipped": "set NO_TORCH_COMPILE=1 before importing moshi for the eager run"}
    kw = {"batch": 2, "seq": 16, "repeats": 2, "stream_steps": 3, "stream_warm": 1} if quick else {}
    res: dict[str, Any] = {"eager": compare(**kw)}
    if not quick:
        res["profile_train_top_ops_ms"] = profile_train()
    if with_compile and not quick:
        res["compiled"] = run_compiled(threads=threads)
    return res


def run_compiled(threads: int | None = None, timeout: float = 1800) -> dict[str, Any]:
    """``compare(compile_models=True)`` in a fresh process where moshi compiles too."""
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "NO_TORCH_COMPILE"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "compiled.json"
        cmd = [sys.executable, "-m", "benchmarks.vs_moshi", "--compile", "--out", str(path)]
        if threads:
            cmd += ["--threads", str(threads)]
        try:
            p = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"skipped": f"compiled run took over {timeout:.0f} s"}
        if p.returncode != 0 or not path.exists():
            return {"failed": (p.stderr or p.stdout)[-2000:]}
        return json.loads(path.read_text())


def main() -> None:
    """``--compile``: the compiled comparison, written as JSON to ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    kw = (
        {"batch": 2, "seq": 16, "repeats": 2, "stream_steps": 3, "stream_warm": 1}
        if args.quick
        else {}
    )
    try:
        res = compare(compile_models=args.compile, **kw)
    except Exception as e:  # noqa: BLE001 - report why compile did not work here
        res = {"failed": f"{type(e).__name__}: {e}"[:2000]}
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
