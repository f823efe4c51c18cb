"""`make bench`: speed of the lab's parts on this machine, written as JSON and a markdown table.

Groups: data-world generation throughput (``world``), codec real-time factors (``codec``), the
tiny speech LM's streaming step and training step (``speech_lm``), the image encoder
(``vision``), and the performance groups of issue 7: vision overhead per streaming step
(``vision_overhead``), ours beside Kyutai's moshi package (``vs_moshi``), the full-duplex loop's
real-time factor (``realtime``) and adapter-training cost (``training``). Results go to
``benchmarks/results/`` (``bench.json``, ``bench.md``).

    python benchmarks/run.py --preset tiny             # everything (make bench)
    python benchmarks/run.py --quick --out /tmp/b      # every code path at smoke sizes
    python benchmarks/run.py --only vs_moshi,realtime --threads 2
    python benchmarks/run.py --only vs_moshi --merge   # redo one group, keep the others

Timings on a shared machine are noisy: comparisons are interleaved and repeated, and reported
as median with inter-quartile range and min-max (see ``benchmarks/common.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi is imported (eager reference)
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from moshivis_lab.config import preset  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], object], repeat: int = 5) -> dict:
    """Median and spread of wall time over ``repeat`` runs (after one warm-up)."""
    fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "runs": repeat}


def bench_world(cfg) -> dict:  # noqa: ANN001
    """Scenes rendered per second, dialogues per second, TTS and timeline speed."""
    from moshivis_lab.world import dialogues, scenes
    from moshivis_lab.world.speech import ASSISTANT_VOICE, USER_VOICES, synthesize
    from moshivis_lab.world.timeline import TTSCache, build_timeline

    rng = np.random.default_rng(0)
    out: dict = {}
    n = 200
    t = timed(
        lambda: [scenes.render(scenes.sample_scene(rng, cfg.world, f"s{i}")) for i in range(n)], 3
    )
    out["scenes_per_s"] = n / t["median_s"]
    sc = scenes.sample_scene(rng, cfg.world, "s")
    t = timed(
        lambda: [dialogues.image_dialogue(sc, k, rng, "d") for k in dialogues.DIALOGUE_KINDS * 50],
        3,
    )
    out["image_dialogues_per_s"] = 300 / t["median_s"]
    text = "What colour is the small triangle at the top left?"
    dur = synthesize(text, ASSISTANT_VOICE).duration
    t = timed(lambda: synthesize(text, USER_VOICES[0]), 10)
    out["tts_x_realtime"] = dur / t["median_s"]
    d = dialogues.chitchat_dialogue(rng, "c")
    turns = [(tn.speaker, tn.text, d.topic, []) for tn in d.turns]
    t = timed(lambda: build_timeline("c", turns, USER_VOICES[0], rng, tts=TTSCache()), 5)
    out["timelines_per_s_uncached"] = 1 / t["median_s"]
    return out


def bench_codec(cfg) -> dict:  # noqa: ANN001
    """Encode/decode real-time factors of the fitted codec (batch and streaming)."""
    from moshivis_lab.audio.codecs import load_codec
    from moshivis_lab.world.speech import ASSISTANT_VOICE, synthesize

    try:
        codec = load_codec(cfg)
    except (FileNotFoundError, ValueError) as e:  # not built, or built by an older format
        return {"skipped": str(e)}
    wav = np.concatenate(
        [
            synthesize(s, ASSISTANT_VOICE).wav
            for s in (
                "Hello there, what can you see in the picture?",
                "There is a large red star at the top left and a small blue circle in the centre.",
                "Three plus four is seven. Have a nice day!",
            )
        ]
    )
    seconds = len(wav) / codec.sample_rate
    codes = codec.encode(wav)
    enc = timed(lambda: codec.encode(wav), 5)
    dec = timed(lambda: codec.decode(codes), 5)

    def stream_decode() -> None:
        s = codec.streaming_decoder()
        for t in range(codes.shape[1]):
            s.step(codes[:, t])

    sdec = timed(stream_decode, 3)
    return {
        "audio_seconds": round(seconds, 2),
        "encode_x_realtime": seconds / enc["median_s"],
        "encode_x_realtime_spread": [seconds / enc["max_s"], seconds / enc["min_s"]],
        "decode_x_realtime": seconds / dec["median_s"],
        "decode_x_realtime_spread": [seconds / dec["max_s"], seconds / dec["min_s"]],
        "stream_decode_ms_per_frame": 1000 * sdec["median_s"] / codes.shape[1],
    }


def bench_lm(cfg, quick: bool = False) -> dict:  # noqa: ANN001
    """The tiny speech LM: streaming step latency (batch 1), real-time factor, training step."""
    import torch

    from moshivis_lab.config import LMConfig
    from moshivis_lab.model import MoshiLM

    torch.manual_seed(0)
    lm_cfg = LMConfig.tiny()
    model = MoshiLM(lm_cfg).eval()
    user = torch.randint(0, lm_cfg.card, (1, lm_cfg.n_q - lm_cfg.dep_q))
    n_steps = 10 if quick else 100
    reps = 1 if quick else 3
    b, t = (2, 16) if quick else (8, 128)

    def stream() -> None:
        with torch.inference_mode(), model.streaming(1, seed=0):
            for _ in range(n_steps):
                model.step(user)

    st = timed(stream, reps)
    step_ms = 1000 * st["median_s"] / n_steps
    codes = torch.randint(0, lm_cfg.card, (b, lm_cfg.num_codebooks, t))
    codes[:, 0] = torch.randint(0, lm_cfg.text_card, (b, t))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        out = model(codes)
        loss = model.loss(codes, out)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    tr = timed(train_step, reps)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "stream_step_ms": step_ms,
        "stream_step_ms_spread": [1000 * st["min_s"] / n_steps, 1000 * st["max_s"] / n_steps],
        "stream_x_realtime": 80.0 / step_ms,
        f"train_step_ms_b{b}_t{t}": 1000 * tr["median_s"],
    }


def bench_vision(cfg) -> dict:  # noqa: ANN001
    """The tiny image encoder: encode latency per image (preprocess + tower) at batch 1 and 16."""
    import torch
    from PIL import Image

    from moshivis_lab.vision import ImageEncoder, VisionConfig
    from moshivis_lab.vision.pretrain import load_vision_encoder

    try:
        encoder, weights = load_vision_encoder(cfg), "pretrained"
    except FileNotFoundError:  # same shapes and cost with random weights
        torch.manual_seed(0)
        encoder, weights = ImageEncoder.from_config(VisionConfig.tiny()), "random (not trained yet)"
    rng = np.random.default_rng(0)
    size = cfg.world.image_size
    images = [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
        for _ in range(16)
    ]
    out: dict = {
        "weights": weights,
        "tokens": encoder.num_tokens,
        "dim": encoder.hidden_size,
        "params": encoder.num_parameters(),
    }
    with torch.inference_mode():
        b1 = timed(lambda: encoder.encode(images[:1]), 10)
        b16 = timed(lambda: encoder.encode(images), 5)
        pre = timed(lambda: encoder.preprocess(images), 5)
    out["encode_ms_per_image_b1"] = 1000 * b1["median_s"]
    out["encode_ms_per_image_b16"] = 1000 * b16["median_s"] / 16
    out["preprocess_ms_per_image_b16"] = 1000 * pre["median_s"] / 16
    return out


GROUPS = (
    "world",
    "codec",
    "speech_lm",
    "vision",
    "vision_overhead",
    "vs_moshi",
    "realtime",
    "training",
)


def run_group(name: str, cfg, args: argparse.Namespace) -> dict:  # noqa: ANN001
    """One group's results; a failure is recorded (with its traceback tail), not raised."""
    quick = args.quick
    try:
        if name == "world":
            return bench_world(cfg)
        if name == "codec":
            return bench_codec(cfg)
        if name == "speech_lm":
            return bench_lm(cfg, quick)
        if name == "vision":
            return bench_vision(cfg)
        if name == "vision_overhead":
            from benchmarks import vision_overhead

            return vision_overhead.bench(quick=quick)
        if name == "vs_moshi":
            from benchmarks import vs_moshi

            return vs_moshi.bench(
                quick=quick, with_compile=not args.no_compile, threads=args.threads
            )
        if name == "realtime":
            from benchmarks import realtime

            return realtime.bench(cfg, quick=quick)
        if name == "training":
            from benchmarks import training

            return training.bench(cfg, quick=quick, threads=args.threads)
    except Exception as e:  # noqa: BLE001 - one broken group must not lose the others
        return {"failed": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-1500:]}
    raise ValueError(f"unknown group {name!r}; choose from {GROUPS}")


# ---------------------------------------------------------------------- markdown


def _is_stats(v: object) -> bool:
    return isinstance(v, dict) and {"median", "q1", "q3", "min", "max"} <= set(v)


def _num(x: float) -> str:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return str(x)
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 0.1:
        return f"{x:.3f}"
    return f"{x:.3g}"


def fmt(v: object) -> str:
    """A value for the markdown table (stats as median [IQR, range])."""
    if _is_stats(v):
        return (
            f"{_num(v['median'])} [IQR {_num(v['q1'])}–{_num(v['q3'])}; "  # type: ignore[index]
            f"range {_num(v['min'])}–{_num(v['max'])}; n={int(v['n'])}]"  # type: ignore[index]
        )
    if isinstance(v, list) and all(isinstance(x, int | float) for x in v):
        return " – ".join(_num(x) for x in v)
    if isinstance(v, str):
        return v.replace("|", "\\|").replace("\n", " ")[:300]
    return _num(v)  # type: ignore[arg-type]


def _rows(prefix: str, v: object, out: list[tuple[str, str]], tables: list[str]) -> None:
    if isinstance(v, dict) and not _is_stats(v):
        for k, x in v.items():
            if k == "traceback":
                continue
            _rows(f"{prefix}.{k}" if prefix else str(k), x, out, tables)
    elif isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
        keys = list(dict.fromkeys(k for r in v for k in r))
        t = [f"**{prefix}**", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        t += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in v]
        tables.append("\n".join(t))
    elif isinstance(v, list) and v and all(isinstance(r, list) for r in v):
        out.append((prefix, "; ".join(", ".join(fmt(x) for x in r) for r in v)))
    else:
        out.append((prefix, fmt(v)))


def headline(res: dict) -> list[tuple[str, str, str]]:
    """The issue's numbers: (what, measured, target)."""

    def get(*path: str) -> object:
        v: object = res
        for p in path:
            if not isinstance(v, dict) or p not in v:
                return None
            v = v[p]
        return v

    rows: list[tuple[str, str, str]] = []

    def add(what: str, v: object, target: str) -> None:
        if v is not None:
            rows.append((what, fmt(v), target))

    vo = "vision_overhead"
    for suffix, label in (("", ""), ("_1_thread", ", 1 thread")):
        add(
            f"vision overhead, tiny{label}, K/V cached",
            get(vo, f"tiny{suffix}", "ratio_cached"),
            "<= 1.10",
        )
        add(
            f"vision overhead, tiny{label}, K/V recomputed",
            get(vo, f"tiny{suffix}", "ratio_recompute"),
            "-",
        )
        real = get(vo, f"real_layer{suffix}")
        for k, v in real.items() if isinstance(real, dict) else []:
            if k.startswith("fill_"):
                what = f"vision overhead, real layer{label} ({k})"
                add(f"{what}, K/V cached", v.get("ratio_cached"), "<= 1.10")
                add(f"{what}, K/V recomputed", v.get("ratio_recompute"), "-")
    real = get(vo, "real_layer")
    for k, v in real.items() if isinstance(real, dict) else []:
        if k.startswith("fill_"):
            add(f"bandwidth model, real layer ({k})", v.get("bytes_model_ratio"), "-")
    add("bandwidth model, tiny", get(vo, "bytes_model_tiny", "ratio"), "-")
    add(
        "bandwidth model, whole 7B, K/V read once",
        get(vo, "bytes_model_full_7b", "kv_once", "ratio"),
        "paper ~1.15",
    )
    for mode in ("eager", "compiled"):
        add(
            f"vs moshi ({mode}): training step ours/theirs",
            get("vs_moshi", mode, "train_ratio_ours_over_theirs"),
            "<= 1.0",
        )
        add(
            f"vs moshi ({mode}): streaming step ours{' (eager)' * (mode == 'compiled')}/theirs",
            get("vs_moshi", mode, "stream_ratio_ours_over_theirs"),
            "<= 0.5",
        )
    add(
        "vs moshi (compiled): streaming step ours (compiled)/theirs",
        get("vs_moshi", "compiled", "stream_ratio_ours_compiled_over_theirs"),
        "-",
    )
    add(
        "full-duplex loop x real time (with image)",
        get("realtime", "x_realtime", "with_image"),
        ">= 5",
    )
    add(
        "adapter training tokens/s (tiny preset, CPU)",
        get("training", "preset", "tokens_per_s"),
        "-",
    )
    add(
        "adapter training RSS increase during steps, MiB (tiny preset)",
        get("training", "preset", "rss_increase_during_steps_mib"),
        "-",
    )
    add(
        "real recipe, batch 1 x 750 steps, estimate GiB",
        get("training", "real_recipe", "batch1_seq750", "total_gib"),
        "<= 80",
    )
    return rows


def to_markdown(res: dict) -> str:
    """The results as markdown: the headline numbers, then every group's values and tables."""
    lines = ["# Benchmarks", ""]
    m = res.get("machine", {})
    lines.append(
        f"{m.get('cpus')} CPUs, {m.get('torch_threads')} torch threads, load average "
        f"{m.get('load_before')} before / {m.get('load_after')} after; quick={m.get('quick')}. "
        "Values: median [inter-quartile range; min–max; repeats]. Ratios are paired per repeat."
    )
    lines += ["", "## Headline", "", "| what | measured | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in headline(res)]
    lines += ["", "## All values", "", "| group | metric | value |", "|---|---|---|"]
    tables: list[str] = []
    for group, vals in res.items():
        rows: list[tuple[str, str]] = []
        _rows("", vals, rows, tables)
        lines += [f"| {group} | {k} | {v} |" for k, v in rows]
    if tables:
        lines += ["", "## Tables", ""]
        lines += [t + "\n" for t in tables]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmarks and write ``bench.json`` and ``bench.md`` into ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--quick", action="store_true", help="every code path at smoke sizes")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--only", default="", help=f"comma-separated groups of {', '.join(GROUPS)}")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    ap.add_argument("--out", default=str(OUT), help="results directory")
    ap.add_argument(
        "--merge", action="store_true", help="update these groups in an existing bench.json"
    )
    args = ap.parse_args(argv)
    groups = [g for g in args.only.split(",") if g] or list(GROUPS)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        ap.error(f"unknown group(s) {bad}; choose from {GROUPS}")
    cfg = preset(args.preset)
    import torch

    torch.set_num_threads(args.threads)
    from benchmarks.common import load

    res: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "quick": args.quick,
            "load_before": load(),
        }
    }
    out = Path(args.out)
    if args.merge and (out / "bench.json").exists():  # keep the other groups of an earlier run
        old = json.loads((out / "bench.json").read_text())
        res = {**old, **{k: v for k, v in res.items() if k != "machine"}}
        res["machine"] = {**old.get("machine", {}), **res["machine"]}
    seconds = dict(res["machine"].get("group_seconds", {}))
    loads = dict(res["machine"].get("group_load_after", {}))
    for g in groups:
        t0 = time.perf_counter()
        res[g] = run_group(g, cfg, args)
        seconds[g] = round(time.perf_counter() - t0, 1)
        loads[g] = load()
        print(f"[bench] {g}: {seconds[g]} s, load {loads[g]}", flush=True)
    res["machine"]["load_after"] = load()
    res["machine"]["group_seconds"] = seconds
    res["machine"]["group_load_after"] = loads
    build = cfg.data_dir / cfg.name / "build_report.json"
    if build.exists() and not args.quick:
        rep = json.loads(build.read_text())
        res["data_build"] = {f"{k}_s": v.get("seconds", 0.0) for k, v in rep["stages"].items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=1, default=str))
    md = to_markdown(res)
    (out / "bench.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
