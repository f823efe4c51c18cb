"""Vision overhead per streaming step: MoshiVis' step time with an image over the base step.

Two shapes, both on CPU at batch 1:

- ``tiny``: the whole tiny MoshiVis (``LMConfig.tiny`` + the paper's adapters in all 6 layers,
  the tiny encoder's 81 tokens x 160). Base = ``model.lm.step`` (the adapters see no image and
  return at once); ``cached`` = ``model.step(user, kv)`` with ``kv = encode_image`` computed once
  per session (the default); ``recompute`` = ``encode_image`` inside every step.
- ``real_layer``: one temporal layer of Moshi 7B (dim 4096, 32 heads, FFN 11264) with the
  released adapter (shared Q/K/V/out cross-attention, conditional-sigmoid gate MLP) over 1024
  image tokens of width 1152, the self-attention cache filled to ``fill`` steps.

Ratios are paired per repeat (cases interleaved, see ``common``). Next to the measurements, a
bandwidth model (``bytes_model``): at batch 1 a CPU (and a GPU) step is bound by reading the
weights and caches, so ``elements(with vision) / elements(without)`` is what the ratio tends to
when nothing else costs; it is a model, not a measurement.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from benchmarks.common import interleaved, ratios, scaled, stats


def _ms(st: dict[str, float]) -> dict[str, float]:
    return scaled(st, 1000.0)


# ---------------------------------------------------------------------- tiny, whole model


def tiny_model(image_dim: int | None = None) -> tuple[Any, torch.Tensor]:
    """The tiny MoshiVis (random weights: the cost does not depend on them) and one image."""
    from moshivis_lab.config import LMConfig, MoshiVisConfig
    from moshivis_lab.model.moshivis import MoshiVis
    from moshivis_lab.vision import VisionConfig

    vc = VisionConfig.tiny()
    dim = image_dim or vc.hidden_size
    torch.manual_seed(0)
    model = MoshiVis(MoshiVisConfig.tiny(LMConfig.tiny(), image_dim=dim)).eval()
    image = torch.randn(1, vc.num_tokens, dim)
    return model, image


def bench_tiny(
    repeats: int = 15, steps: int = 40, warm: int = 8, adapter_calls: int = 50
) -> dict[str, Any]:
    """Per-step ms of base / cached / recompute on the tiny model, and paired ratios."""
    model, image = tiny_model()
    lm_cfg = model.cfg.lm
    user = torch.randint(
        0, lm_cfg.card, (1, model.n_user), generator=torch.Generator().manual_seed(0)
    )

    def case(mode: str):
        def run() -> float:
            with torch.inference_mode(), model.streaming(1, seed=0):
                kv = model.encode_image(image)

                def one() -> None:
                    if mode == "base":
                        model.lm.step(user)
                    elif mode == "cached":
                        model.step(user, kv)
                    elif mode == "cached_gates_read":  # a caller that plots the gates
                        model.step(user, kv)
                        model.last_gates  # noqa: B018 - averaged on read
                    else:
                        model.step(user, model.encode_image(image))

                for _ in range(warm):
                    one()
                t0 = time.perf_counter()
                for _ in range(steps):
                    one()
                return (time.perf_counter() - t0) / steps

        return run

    modes = ("base", "cached", "cached_gates_read", "recompute")
    t = interleaved({m: case(m) for m in modes}, repeats)
    with torch.inference_mode():
        enc = interleaved({"encode": lambda: model.encode_image(image)}, max(2, repeats))["encode"]
        adapter_us = _adapter_time(model, image, repeats, adapter_calls)
    prof = profile_step(model, image, user)
    return {
        "shape": {
            "dim": lm_cfg.dim,
            "layers": lm_cfg.num_layers,
            "xa_layers": len(model.cfg.layers),
            "image_tokens": int(image.shape[1]),
            "image_dim": int(image.shape[2]),
            "positions": f"{warm}..{warm + steps - 1}",
        },
        "step_ms": {m: _ms(stats(t[m])) for m in modes},
        "ratio_cached": stats(ratios(t["cached"], t["base"])),
        "ratio_cached_gates_read": stats(ratios(t["cached_gates_read"], t["base"])),
        "ratio_recompute": stats(ratios(t["recompute"], t["base"])),
        "encode_image_ms": _ms(stats(enc)),
        "adapter_us_per_layer": adapter_us,
        "profile": prof,
    }


def profile_step(model: Any, image: torch.Tensor, user: torch.Tensor, steps: int = 10) -> dict:
    """torch.profiler over streaming steps without and with the image: aten calls per step
    (top level, independent of machine load) and the top ops by self CPU time per step."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, Any] = {}
    for mode in ("base", "cached"):
        with torch.inference_mode(), model.streaming(1, seed=0):
            kv = model.encode_image(image)

            def one(mode: str = mode, kv: Any = kv) -> None:
                if mode == "base":
                    model.lm.step(user)
                else:
                    model.step(user, kv)

            for _ in range(3):
                one()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    one()
        top = sum(1 for e in prof.events() if e.cpu_parent is None) / steps
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
        out[mode] = {
            "aten_calls_per_step": top,
            "top_self_cpu_ms_per_step": [
                [e.key, round(e.self_cpu_time_total / 1000 / steps, 3)] for e in rows
            ],
        }
    out["aten_calls_ratio"] = (
        out["cached"]["aten_calls_per_step"] / out["base"]["aten_calls_per_step"]
    )
    return out


def _adapter_time(model: Any, image: torch.Tensor, repeats: int, n: int) -> dict[str, float]:
    """Microseconds of one adapter call at ``T = 1`` (all layers in turn, averaged)."""
    from moshivis_lab.model.adapters import XACall

    kv = model.encode_image(image)
    x = torch.randn(1, 1, model.cfg.lm.dim)
    adapters = model.adapters

    def run() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            call = XACall(kv, lazy_gates=True, checked=True)  # as MoshiVis.step makes it
            for a in adapters:
                a(x, call)
        return (time.perf_counter() - t0) / (n * len(adapters))

    return scaled(stats(interleaved({"a": run}, repeats)["a"]), 1e6)


# ---------------------------------------------------------------------- one real-shape layer


def real_layer(
    dim: int = 4096,
    heads: int = 32,
    hidden_scale: float = 4.125,
    image_tokens: int = 1024,
    image_dim: int = 1152,
    context: int = 3000,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """One Moshi temporal layer with the released adapter in its cross-attention slot."""
    from moshivis_lab.model.adapters import CrossAttention, GatedCrossAttention, ImagePrefix, XAGate
    from moshivis_lab.model.layers import KVCache, TransformerLayer

    torch.manual_seed(0)
    eps = 1e-8
    with torch.no_grad():
        layer = TransformerLayer(dim, heads, int(hidden_scale * dim), eps, context=context)
        shared = CrossAttention(dim, heads)
        gate = XAGate("conditional_sigmoid", dim)
        layer.cross_attention = GatedCrossAttention(
            0, dim, heads, eps, shared, gate, mha_shared=True, gate_shared=False, kv_group=0
        )
        prefix = ImagePrefix(image_dim, dim, eps)
        for m in (layer, shared, prefix):
            m.to(dtype).eval()
        hd = dim // heads
        cache = KVCache(
            torch.randn(1, heads, context, hd, dtype=dtype),
            torch.randn(1, heads, context, hd, dtype=dtype),
        )
    image = torch.randn(1, image_tokens, image_dim, dtype=dtype)
    return {
        "layer": layer,
        "shared": shared,
        "prefix": prefix,
        "cache": cache,
        "image": image,
        "dim": dim,
        "heads": heads,
    }


def bench_real_layer(
    repeats: int = 7,
    steps: int = 6,
    recompute_steps: int = 1,
    fills: tuple[int, ...] = (250, 3000),
    dtype: torch.dtype = torch.float32,
    **shape: Any,
) -> dict[str, Any]:
    """Per-step ms of one real-shape layer without / with vision (cached, recomputed K/V)."""
    from moshivis_lab.model.adapters import ImageKV, XACall
    from moshivis_lab.model.layers import rope_rotations

    r = real_layer(dtype=dtype, **shape)
    layer, cache, image = r["layer"], r["cache"], r["image"]
    dim, heads = r["dim"], r["heads"]
    ctx = cache.capacity
    x = torch.randn(1, 1, dim, dtype=dtype)

    def encode() -> ImageKV:
        k, v = r["shared"].project_kv(r["prefix"](image))
        return ImageKV((k,), (v,))

    with torch.inference_mode():
        kv = encode()
    out: dict[str, Any] = {
        "shape": {
            "dim": dim,
            "heads": heads,
            "ffn_hidden": layer.gating.linear_out.in_features,
            "image_tokens": int(image.shape[1]),
            "image_dim": int(image.shape[2]),
            "context": ctx,
            "dtype": str(dtype).replace("torch.", ""),
            "layer_params": sum(p.numel() for n, p in layer.named_parameters() if "cross" not in n),
            "adapter_params_per_step": _adapter_step_params(layer),
        },
    }
    for fill in fills:
        pos = min(fill, ctx) - 1
        rope = rope_rotations(torch.tensor([pos]), dim // heads, 10000.0)

        def case(mode: str, n: int, rope: torch.Tensor = rope, pos: int = pos):
            def run() -> float:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    for _ in range(n):
                        if mode == "base":
                            call = None
                        elif mode == "cached":
                            call = XACall(kv)
                        else:
                            call = XACall(encode())
                        layer(x, rope=rope, cache=cache, pos=pos, cross_kv=call)
                    return (time.perf_counter() - t0) / n

            return run

        cases = {"base": case("base", steps), "cached": case("cached", steps)}
        if recompute_steps > 0:
            cases["recompute"] = case("recompute", recompute_steps)
        t = interleaved(cases, repeats)
        res: dict[str, Any] = {
            "step_ms": {m: _ms(stats(v)) for m, v in t.items()},
            "ratio_cached": stats(ratios(t["cached"], t["base"])),
        }
        if "recompute" in t:
            res["ratio_recompute"] = stats(ratios(t["recompute"], t["base"]))
        res["bytes_model_ratio"] = layer_bytes_ratio(
            dim, layer.gating.linear_out.in_features, int(image.shape[1]), pos + 1
        )
        out[f"fill_{pos + 1}"] = res
    return out


def _adapter_step_params(layer: Any) -> int:
    """Adapter weights read by one step of one layer: Q and out projections, gate, norm."""
    a = layer.cross_attention
    mha = a.attention
    n = mha.q_weight().numel() + mha.out_proj.weight.numel() + a.norm_cross.alpha.numel()
    gate = a.gate_module
    if gate is not None:
        n += sum(p.numel() for p in gate.parameters())
    return n


def layer_bytes_ratio(dim: int, hidden: int, image_tokens: int, filled: int) -> float:
    """Elements read by one layer step with vision over without (weights + caches)."""
    base = 4 * dim * dim + 3 * dim * hidden + 2 * filled * dim + 2 * dim
    xa = 2 * dim * dim + 2 * dim * (dim // 8) + 2 * image_tokens * dim + dim
    return (base + xa) / base


@functools.lru_cache(maxsize=4)
def _model_counts(cfg: Any) -> tuple[int, int, int, int, int]:
    """(base elements read per step, adapter elements per layer, dim, layers, xa layers)."""
    from moshivis_lab.model.moshivis import MoshiVis

    with torch.device("meta"):
        model = MoshiVis(cfg)
    lm = model.lm
    emb = sum(p.numel() for n, p in lm.named_parameters() if "emb" in n.split(".")[0])
    adapters = {id(p) for a in model.adapters for p in a.parameters()}
    adapters |= {id(p) for m in (model.image_prefix, model.shared_xa) for p in m.parameters()}
    base = sum(p.numel() for p in lm.parameters() if id(p) not in adapters) - emb
    per_layer = _adapter_step_params_module(model.adapters[0])
    return base, per_layer, cfg.lm.dim, cfg.lm.num_layers, len(cfg.layers)


def bytes_model_full(
    filled: int = 0, image_tokens: int = 1024, kv_once: bool = False, cfg: Any = None
) -> dict:
    """The bandwidth model of a whole MoshiVis step (batch 1), counted on the meta device;
    ``cfg``: ``MoshiVisConfig.moshika_vis()`` (Moshi 7B + the released adapters) by default.

    Base: every temporal and depformer weight, the text head and the depformer heads are read
    once per step, embeddings only by row; the self-attention caches hold ``filled`` steps.
    Vision: per cross-attention layer the shared Q and out projections, the layer's gate and
    norm, and the image keys/values (read by every layer, or once if ``kv_once``: a cache that
    holds them).
    """
    from moshivis_lab.config import MoshiVisConfig

    base, per_layer, d, layers, xa_layers = _model_counts(cfg or MoshiVisConfig.moshika_vis())
    base += 2 * filled * d * layers
    kv = 2 * image_tokens * d
    xa = xa_layers * per_layer + (kv if kv_once else kv * xa_layers)
    return {
        "base_elements": base,
        "vision_elements": xa,
        "ratio": (base + xa) / base,
        "filled": filled,
        "kv_read": "once" if kv_once else "per layer",
    }


def _adapter_step_params_module(a: Any) -> int:
    mha = a.attention
    n = mha.dim * mha.dim + mha.out_proj.weight.numel() + a.norm_cross.alpha.numel()
    gate = a.gate_module
    if gate is not None:
        n += sum(p.numel() for p in gate.parameters())
    return n


def bench(quick: bool = False, single_thread_too: bool = True) -> dict[str, Any]:
    """Both shapes (smaller real shape and fewer repeats with ``quick``).

    With ``single_thread_too`` both are measured again with one torch thread: on a machine
    whose cores other jobs share, an op that splits over 2 threads waits for the busier core
    (milliseconds), which a 1-thread run does not.
    """
    from benchmarks.common import threads

    if quick:
        tiny_kw: dict[str, Any] = {"repeats": 2, "steps": 3, "warm": 1, "adapter_calls": 3}
        real_kw: dict[str, Any] = {
            "repeats": 2,
            "steps": 2,
            "recompute_steps": 1,
            "fills": (16,),
            "dim": 256,
            "heads": 8,
            "image_tokens": 64,
            "image_dim": 96,
            "context": 32,
        }
    else:
        tiny_kw, real_kw = {}, {}
    model, image = tiny_model()
    out: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "tiny": bench_tiny(**tiny_kw),
        "real_layer": bench_real_layer(**real_kw),
    }
    if single_thread_too and torch.get_num_threads() != 1:
        with threads(1):
            out["tiny_1_thread"] = bench_tiny(**tiny_kw)
            out["real_layer_1_thread"] = bench_real_layer(**real_kw)
    out["bytes_model_tiny"] = bytes_model_full(
        40, int(image.shape[1]), kv_once=False, cfg=model.cfg
    )
    out["bytes_model_full_7b"] = {
        "kv_per_layer": bytes_model_full(0, kv_once=False),
        "kv_once": bytes_model_full(0, kv_once=True),
        "kv_once_fill_3000": bytes_model_full(3000, kv_once=True),
    }
    out["target"] = "ratio_cached <= 1.10 at both shapes; paper: ~1.15 (55 vs 48 ms, whole model)"
    return out
