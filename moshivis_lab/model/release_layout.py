"""The architecture of a released-layout MoshiVis checkpoint, read off its tensors' names and shapes.

Kyutai's model repositories hold no config file: ``model.safetensors`` is all there is. The names
and shapes fix almost everything: widths, layer counts, vocabularies, how many audio rows, which
layers cross-attend, whether projections and gates are shared, the encoder tower's width, depth,
patch and native size. What they cannot fix (attention heads, delays, RoPE period, context,
norm eps, the kyuteye numerics) comes from a template config (the ``moshika-vis`` preset); heads
are derived from the template's head width when the width divides. ``infer_moshivis_config``
returns the config and a report naming, for every field, whether it was read or assumed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from moshivis_lab.config import MoshiVisConfig
from moshivis_lab.model.layers import ffn_hidden_size

Shapes = Mapping[str, tuple[int, ...]]
_LAYER = re.compile(r"^llm\.transformer\.layers\.(\d+)\.")
_DEP_LAYER = re.compile(r"^depformer\.layers\.(\d+)\.")
ENCODER = "image_prefix.enc.model."


@dataclass
class InferredArchitecture:
    """``config`` (the LM + adapters), ``vision`` (the tower's fields, None without one) and,
    per field, ``read`` (from which tensor) or ``assumed`` (why: the shapes cannot tell)."""

    config: MoshiVisConfig
    vision: dict[str, int] | None
    read: dict[str, str] = field(default_factory=dict)
    assumed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines a notebook can print: what was read, what was taken from the template."""
        lm = self.config.lm
        lines = [
            f"LM: {lm.num_layers} layers x {lm.dim} ({lm.num_heads} heads), text {lm.text_card}, "
            f"audio {lm.n_q} rows x {lm.card}, depformer {lm.depformer_num_layers} x "
            f"{lm.depformer_dim}; cross-attention in {len(self.config.layers)} layers "
            f"(sharing={self.config.xa.sharing!r}, gate_shared={self.config.xa.gate_shared})",
        ]
        if self.vision:
            v = self.vision
            lines.append(
                f"encoder: {v['num_layers']} layers x {v['hidden_size']}, patch {v['patch_size']},"
                f" {v['image_size']} px native"
            )
        lines.append(
            "not in the shapes, taken from the template: " + ", ".join(sorted(self.assumed))
        )
        return "\n".join(lines)


def _need(shapes: Shapes, name: str, source: str) -> tuple[int, ...]:
    if name not in shapes:
        raise ValueError(
            f"{source}: no tensor {name!r}; this is not a MoshiVis checkpoint in the released "
            "(kyutai-labs/moshivis) layout"
        )
    return tuple(shapes[name])


def _count(shapes: Shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m[1] for k in shapes if (m := rx.match(k))})


def _heads(width: int, template_width: int, template_heads: int) -> tuple[int, bool]:
    """Heads for ``width`` at the template's head width (True) or the template's count (False)."""
    head = template_width // template_heads
    if width % head == 0:
        return width // head, True
    return (template_heads if width % template_heads == 0 else 1), False


def _hidden_scale(dim: int, hidden: int, template: float) -> float:
    """A ``hidden_scale`` whose gated-FFN hidden size is ``hidden`` (the template's if it fits)."""
    if ffn_hidden_size(dim, int(template * dim)) == hidden:
        return template
    for ff in range(3 * hidden // 2 - 2, 3 * hidden // 2 + 3):
        scale = ff / dim
        if ff > 0 and ffn_hidden_size(dim, int(scale * dim)) == hidden:
            return scale
    raise ValueError(f"no FFN width gives a gated hidden size of {hidden} at dim {dim}")


def infer_from_shapes(
    shapes: Shapes, template: MoshiVisConfig | None = None, source: str = "checkpoint"
) -> InferredArchitecture:
    """The architecture of a released-layout state with these tensor shapes (see the module)."""
    tpl = template or MoshiVisConfig.moshika_vis()
    read: dict[str, str] = {}
    text_emb = _need(shapes, "llm.text_emb.weight", source)
    dim = text_emb[1]
    read["dim"] = "llm.text_emb.weight"
    text_card = _need(shapes, "llm.text_linear.weight", source)[0]
    read["text_card"] = "llm.text_linear.weight"
    num_layers = _count(shapes, r"^llm\.transformer\.layers\.(\d+)\.")
    read["num_layers"] = "llm.transformer.layers.*"
    n_q = _count(shapes, r"^audio_emb\.(\d+)\.")
    card = _need(shapes, "audio_emb.0.weight", source)[0] - 1
    read["n_q"], read["card"] = "audio_emb.*", "audio_emb.0.weight"
    dep_q = _count(shapes, r"^audio_linears\.(\d+)\.")
    read["dep_q"] = "audio_linears.*"
    dd = _need(shapes, "depformer_in.0.weight", source)[0]
    read["depformer_dim"] = "depformer_in.0.weight"
    dep_layers = _count(shapes, r"^depformer\.layers\.(\d+)\.")
    read["depformer_num_layers"] = "depformer.layers.*"
    multi = _count(shapes, r"^depformer_in\.(\d+)\.") > 1
    read["depformer_multi_linear"] = "depformer_in.*"
    dep_in = _need(shapes, "depformer.layers.0.self_attn.in_proj_weight", source)[0]
    per_step = dep_in == dep_q * 3 * dd and dep_q > 1
    read["depformer_weights_per_step"] = "depformer.layers.0.self_attn.in_proj_weight"
    hidden = _need(shapes, "llm.transformer.layers.0.gating.linear_in.weight", source)[0] // 2
    dep_key = "depformer.layers.0.gating" + (".0" if per_step else "") + ".linear_in.weight"
    dep_hidden = _need(shapes, dep_key, source)[0] // 2
    read["hidden_scale"] = "llm.transformer.layers.0.gating.linear_in.weight"
    read["depformer_hidden_scale"] = dep_key
    t = tpl.lm
    heads, h_ok = _heads(dim, t.dim, t.num_heads)
    dep_heads, d_ok = _heads(dd, t.depformer_dim, t.depformer_num_heads)
    assumed = {
        "num_heads": f"{heads}: head width {t.dim // t.num_heads} as the template"
        if h_ok
        else f"{heads}: the template's count (or 1 if it does not divide {dim})",
        "depformer_num_heads": f"{dep_heads}: head width {t.depformer_dim // t.depformer_num_heads}"
        if d_ok
        else f"{dep_heads}: the template's count (or 1 if it does not divide {dd})",
    }
    if len(t.delays) == 1 + n_q and t.dep_q == dep_q:
        delays = t.delays
        assumed["delays"] = "the template's"
    else:  # Moshi's pattern: text and each stream's semantic row 0, acoustic rows 1
        own = (0,) + (1,) * (dep_q - 1)
        other = (0,) + (1,) * (n_q - dep_q - 1) if n_q > dep_q else ()
        delays = (0,) + own + other
        assumed["delays"] = "Moshi's pattern (semantic rows 0, acoustic rows 1)"
    for name in ("context", "max_period", "norm_eps", "depformer_norm"):
        assumed[name] = f"{getattr(t, name)!r} (the template's)"
    lm = dataclasses.replace(
        t,
        dim=dim,
        num_layers=num_layers,
        num_heads=heads,
        hidden_scale=_hidden_scale(dim, hidden, t.hidden_scale),
        text_card=text_card,
        card=card,
        n_q=n_q,
        dep_q=dep_q,
        delays=tuple(delays),
        depformer_dim=dd,
        depformer_num_layers=dep_layers,
        depformer_num_heads=dep_heads,
        depformer_hidden_scale=_hidden_scale(dd, dep_hidden, t.depformer_hidden_scale),
        depformer_weights_per_step=per_step,
        depformer_multi_linear=multi,
    )

    # The adapters.
    xa_layers = sorted(
        {int(m[1]) for k in shapes if (m := _LAYER.match(k)) and ".norm_cross." in k}
    )
    if not xa_layers:
        raise ValueError(
            f"{source}: no llm.transformer.layers.*.norm_cross: a Moshi without adapters"
        )
    read["xa_layers"] = "llm.transformer.layers.*.norm_cross.alpha"
    first = f"llm.transformer.layers.{xa_layers[0]}.cross_attention."
    last = f"llm.transformer.layers.{xa_layers[-1]}.cross_attention."
    if first + "mha.in_proj_weight_kv" in shapes:
        sharing = "kv"
    elif first + "mha.in_proj_weight" in shapes:
        # stored once under the first layer when shared (a copy in every layer reads as "none")
        many = len(xa_layers) > 1 and last + "mha.in_proj_weight" in shapes
        sharing = "none" if many else "qkv"
    else:
        raise ValueError(f"{source}: no cross-attention projections under {first}mha.*")
    read["sharing"] = first + "mha.*"
    if first + "gate.alpha.0.weight" in shapes:
        gating = "conditional_sigmoid"
    elif first + "gate.alpha" in shapes:
        gating = "tanh_scalar"
    else:
        gating = "none"
    in_last = last + "gate.alpha.0.weight" in shapes or last + "gate.alpha" in shapes
    gate_shared = (
        gating != "none"
        and len(xa_layers) > 1
        and (last + "per_layer_alpha" in shapes or not in_last)
    )
    read["gating"] = read["gate_shared"] = first + "gate.*"
    proj = _need(shapes, "image_prefix.proj_xa.weight", source)
    read["image_dim"] = "image_prefix.proj_xa.weight"
    txa = tpl.xa
    for name in ("xa_start", "gate_bias", "norm_xa", "norm_xa_eps", "norm_xa_fp32", "gate_readout"):
        assumed[name] = f"{getattr(txa, name)!r} (the template's)"
    xa = dataclasses.replace(
        txa,
        gating=gating,
        sharing=sharing,
        gate_shared=gate_shared,
        xa_layers=None if xa_layers == list(range(num_layers)) else tuple(xa_layers),
        image_dim=proj[1],
        num_heads=None,
    )
    cfg = MoshiVisConfig(lm=lm, xa=xa)

    vision = None
    patch = f"{ENCODER}embeddings.patch_embedding.weight"
    if patch in shapes:
        hidden_size, _, p, _ = shapes[patch]
        positions = _need(shapes, f"{ENCODER}embeddings.position_embedding.weight", source)[0]
        side = math.isqrt(positions)
        vision = {
            "hidden_size": hidden_size,
            "patch_size": p,
            "image_size": side * p,
            "num_layers": _count(shapes, rf"^{re.escape(ENCODER)}encoder\.layers\.(\d+)\."),
            "intermediate_size": _need(shapes, f"{ENCODER}encoder.layers.0.mlp.fc1.weight", source)[
                0
            ],
        }
        read["vision"] = ENCODER + "*"
    return InferredArchitecture(cfg, vision, read, assumed)


def infer_moshivis_config(
    path: str | os.PathLike[str], template: MoshiVisConfig | None = None
) -> InferredArchitecture:
    """``infer_from_shapes`` on a ``model.safetensors`` (only its header is read)."""
    from moshivis_lab.model.checkpoint import _open

    p, shapes, _ = _open(Path(path))
    return infer_from_shapes(shapes, template, str(p))
