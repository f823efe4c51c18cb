"""`make bench`: speed of the lab's parts on this machine, written as JSON and a markdown table.

Now: data-world generation throughput (scenes, dialogues, TTS, timelines), codec real-time
factors (encode/decode, batch and streaming), and the tiny speech LM's streaming step latency,
real-time factor and training step. Results go to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from moshivis_lab.config import preset

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
    except FileNotFoundError as e:
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


def bench_lm(cfg) -> dict:  # noqa: ANN001
    """The tiny speech LM: streaming step latency (batch 1), real-time factor, training step."""
    import torch

    from moshivis_lab.config import LMConfig
    from moshivis_lab.model import MoshiLM

    torch.manual_seed(0)
    lm_cfg = LMConfig.tiny()
    model = MoshiLM(lm_cfg).eval()
    user = torch.randint(0, lm_cfg.card, (1, lm_cfg.n_q - lm_cfg.dep_q))
    n_steps = 100

    def stream() -> None:
        with torch.inference_mode(), model.streaming(1, seed=0):
            for _ in range(n_steps):
                model.step(user)

    st = timed(stream, 3)
    step_ms = 1000 * st["median_s"] / n_steps
    codes = torch.randint(0, lm_cfg.card, (8, lm_cfg.num_codebooks, 128))
    codes[:, 0] = torch.randint(0, lm_cfg.text_card, (8, 128))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        out = model(codes)
        loss = model.loss(codes, out)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    tr = timed(train_step, 3)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "stream_step_ms": step_ms,
        "stream_step_ms_spread": [1000 * st["min_s"] / n_steps, 1000 * st["max_s"] / n_steps],
        "stream_x_realtime": 80.0 / step_ms,
        "train_step_ms_b8_t128": 1000 * tr["median_s"],
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


def to_markdown(res: dict) -> str:
    """The results as a markdown table."""
    lines = ["| group | metric | value |", "|---|---|---|"]
    for group, vals in res.items():
        if not isinstance(vals, dict):
            continue
        for k, v in vals.items():
            if isinstance(v, float):
                v = f"{v:,.2f}"
            elif isinstance(v, list):
                v = " – ".join(f"{x:,.1f}" for x in v)
            lines.append(f"| {group} | {k} | {v} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run every benchmark and write ``results/bench.json`` and ``results/bench.md``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    cfg = preset(args.preset)
    import torch

    res = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "world": bench_world(cfg),
        "codec": bench_codec(cfg),
        "speech_lm": bench_lm(cfg),
        "vision": bench_vision(cfg),
    }
    build = cfg.data_dir / cfg.name / "build_report.json"
    if build.exists():
        rep = json.loads(build.read_text())
        res["data_build"] = {f"{k}_s": v.get("seconds", 0.0) for k, v in rep["stages"].items()}
    OUT.mkdir(exist_ok=True)
    (OUT / "bench.json").write_text(json.dumps(res, indent=1))
    md = to_markdown(res)
    (OUT / "bench.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
