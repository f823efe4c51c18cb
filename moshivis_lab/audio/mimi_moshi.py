"""Mimi from the ``moshi`` package's own file (what Kyutai ships next to its LMs) as transformers'
``MimiModel``.

Kyutai's model repositories hold Mimi as ``tokenizer-e351c8d8-checkpoint125.safetensors`` in the
``moshi`` layout (``encoder.model.{i}.conv.conv.weight``, ``quantizer.rvq_first.vq.layers...``,
merged attention projections with interleaved RoPE), without a config. This module reads the
architecture off the tensor shapes (widths, filters, strides, layers, codebooks; what shapes
cannot tell comes from ``MimiConfig()``, kyutai/mimi's defaults, with heads at its 64-wide head),
renames every tensor to the installed transformers' ``MimiModel`` names, splits each merged
projection into q/k/v and permutes q/k from interleaved to half-split RoPE. The load is strict.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

MOSHI_MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
_FIRST_CONV = "encoder.model.0.conv.conv.weight"


def is_moshi_mimi_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a safetensors file in the ``moshi`` package's Mimi layout."""
    p = Path(path)
    if not p.is_file() or p.suffix != ".safetensors":
        return False
    with safe_open(str(p), "pt") as f:
        return _FIRST_CONV in f.keys()


def _count(names: list[str], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m[1] for n in names if (m := rx.match(n))})


def moshi_mimi_config(shapes: dict[str, tuple[int, ...]]) -> Any:
    """The ``MimiConfig`` of a moshi-layout Mimi with these tensor shapes."""
    from transformers import MimiConfig

    tpl = MimiConfig()
    names = sorted(shapes)
    hidden = shapes["downsample.conv.conv.conv.weight"][0]
    filters = shapes[_FIRST_CONV][0]
    # The encoder's downsampling convs (kernel 2 * ratio) follow its residual blocks, in the
    # reverse order of the decoder's upsampling ratios.
    convs = sorted(
        int(m[1])
        for n in names
        if (m := re.match(r"^encoder\.model\.(\d+)\.conv\.conv\.weight$", n)) and m[1] != "0"
    )
    kernels = [shapes[f"encoder.model.{i}.conv.conv.weight"][2] for i in convs[:-1]]
    ratios = [k // 2 for k in reversed(kernels)]
    first = _count(names, r"^quantizer\.rvq_first\.vq\.layers\.(\d+)\.")
    rest = _count(names, r"^quantizer\.rvq_rest\.vq\.layers\.(\d+)\.")
    book = shapes["quantizer.rvq_first.vq.layers.0._codebook.embedding_sum"]
    layers = _count(names, r"^encoder_transformer\.transformer\.layers\.(\d+)\.")
    ff = shapes["encoder_transformer.transformer.layers.0.linear1.weight"][0]
    head = tpl.head_dim
    heads = hidden // head if hidden % head == 0 else 1
    return MimiConfig(
        hidden_size=hidden,
        num_filters=filters,
        upsampling_ratios=ratios,
        codebook_size=book[0],
        codebook_dim=book[1],
        vector_quantization_hidden_dimension=shapes["quantizer.rvq_first.input_proj.weight"][0],
        num_quantizers=first + rest,
        num_semantic_quantizers=first,
        upsample_groups=hidden,
        num_hidden_layers=layers,
        intermediate_size=ff,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
    )


_RENAMES = (  # moshi -> transformers 4 names (kyutai/mimi on the Hub)
    ("conv.conv.conv", "conv"),
    ("convtr.convtr.convtr", "conv"),
    ("conv.conv", "conv"),
    ("convtr.convtr", "conv"),
    ("quantizer.rvq_first.vq", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_first", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_rest.vq", "quantizer.acoustic_residual_vector_quantizer"),
    ("quantizer.rvq_rest", "quantizer.acoustic_residual_vector_quantizer"),
    ("_codebook", "codebook"),
    ("_initialized", "initialized"),
    ("embedding_sum", "embed_sum"),
    ("encoder.model", "encoder.layers"),
    ("decoder.model", "decoder.layers"),
    ("encoder_transformer.transformer", "encoder_transformer"),
    ("decoder_transformer.transformer", "decoder_transformer"),
    ("linear1", "mlp.fc1"),
    ("linear2", "mlp.fc2"),
    ("self_attn.out_projs.0", "self_attn.o_proj"),
    ("self_attn.out_proj", "self_attn.o_proj"),
    ("self_attn.in_projs.0.weight", "self_attn.in_proj_weight"),
    ("norm1", "input_layernorm"),
    ("norm2", "post_attention_layernorm"),
    ("layer_scale_1", "self_attn_layer_scale"),
    ("layer_scale_2", "mlp_layer_scale"),
)
_V5 = (  # transformers 5 nests the parts under encoder / decoder
    ("encoder.layers.", "encoder.encoder_seanet.layers."),
    ("decoder.layers.", "decoder.decoder_seanet.layers."),
    ("encoder_transformer.", "encoder.encoder_transformer."),
    ("decoder_transformer.", "decoder.decoder_transformer."),
    ("downsample.", "encoder.downsample."),
    ("upsample.", "decoder.upsample."),
)


def _hf_name(name: str, nested: bool) -> str:
    for old, new in _RENAMES:
        name = name.replace(old, new)
    if nested:
        for old, new in _V5:
            if name.startswith(old):
                return new + name[len(old) :]
    return name


def _half_split(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection from interleaved RoPE pairs (moshi) to halves (transformers)."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def load_moshi_mimi(path: str | os.PathLike[str]) -> Any:
    """A transformers ``MimiModel`` (eval, float32) with the weights of a moshi-layout file."""
    from transformers import MimiModel

    path = Path(path).expanduser()
    if not is_moshi_mimi_file(path):
        raise ValueError(
            f"{path}: not a Mimi file in the moshi layout (no {_FIRST_CONV}); give Kyutai's "
            f"{MOSHI_MIMI_FILE} or a Hugging Face kyutai/mimi directory"
        )
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    config = moshi_mimi_config({k: tuple(v.shape) for k, v in state.items()})
    model = MimiModel(config)  # not on meta: its non-persistent buffers (RoPE) are computed here
    expected = model.state_dict()
    nested = "encoder.encoder_seanet.layers.0.conv.weight" in expected
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        new = _hf_name(name, nested)
        if new.endswith("self_attn.in_proj_weight"):
            q, k, v = t.float().chunk(3, dim=0)
            base = new[: -len("in_proj_weight")]
            out[base + "q_proj.weight"] = _half_split(q, heads)
            out[base + "k_proj.weight"] = _half_split(k, kv_heads)
            out[base + "v_proj.weight"] = v
        else:
            out[new] = t.float()
    missing = sorted(set(expected) - set(out))
    extra = sorted(set(out) - set(expected))
    shaped = sorted(k for k in set(out) & set(expected) if out[k].shape != expected[k].shape)
    if missing or extra or shaped:
        parts = [
            f"{len(names)} {what}: {', '.join(names[:8])}" + (" ..." if len(names) > 8 else "")
            for names, what in ((missing, "missing"), (extra, "unexpected"), (shaped, "mis-shaped"))
            if names
        ]
        raise ValueError(f"{path}: not a Mimi this transformers can hold ({'; '.join(parts)})")
    model.load_state_dict(out, strict=True)
    return model.eval()


def _interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of ``_half_split``: q/k rows from halves (transformers) to interleaved (moshi)."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


_SEANET = re.compile(r"^(encoder|decoder)\.(?:\1_seanet\.)?layers\.(\d+)\.(.+)$")
_XFORMER = re.compile(
    r"^(?:encoder\.|decoder\.)?(encoder|decoder)_transformer\.layers\.(\d+)\.(.+)$"
)
_BACK = {
    "self_attn.o_proj.weight": "self_attn.out_proj.weight",
    "mlp.fc1.weight": "linear1.weight",
    "mlp.fc2.weight": "linear2.weight",
    "self_attn_layer_scale.scale": "layer_scale_1.scale",
    "mlp_layer_scale.scale": "layer_scale_2.scale",
}


def to_moshi_state(model: Any) -> dict[str, torch.Tensor]:
    """A transformers ``MimiModel``'s weights in the moshi layout, as Kyutai's file holds them
    (merged ``self_attn.in_proj_weight`` with interleaved RoPE rows, ``self_attn.out_proj``)."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in model.state_dict().items():
        t = t.detach().float().contiguous()
        if m := _SEANET.match(name):
            side, i, rest = m[1], m[2], m[3]
            module = (
                model.get_submodule(name.rsplit(".", 1)[0]) if rest.startswith("conv.") else None
            )
            wrap = "convtr.convtr" if isinstance(module, torch.nn.ConvTranspose1d) else "conv.conv"
            rest = rest.replace("conv.", wrap + ".", 1) if rest.startswith("conv.") else rest
            rest = rest.replace(".conv.", ".conv.conv.") if rest.startswith("block.") else rest
            out[f"{side}.model.{i}.{rest}"] = t
        elif m := _XFORMER.match(name):
            head = f"{m[1]}_transformer.transformer.layers.{m[2]}."
            rest = m[3]
            if rest in (
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
            ):
                qkv.setdefault(head, {})[rest.split(".")[1][0]] = t
                continue
            for old, new in (("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2")):
                rest = rest.replace(old, new)
            out[head + _BACK.get(rest, rest)] = t
        elif name.endswith("downsample.conv.weight"):
            out["downsample.conv.conv.conv.weight"] = t
        elif name.endswith("upsample.conv.weight"):
            out["upsample.convtr.convtr.convtr.weight"] = t
        elif name.startswith("quantizer."):
            new = name.replace("semantic_residual_vector_quantizer.layers", "rvq_first.vq.layers")
            new = new.replace("acoustic_residual_vector_quantizer.layers", "rvq_rest.vq.layers")
            new = new.replace("semantic_residual_vector_quantizer", "rvq_first")
            new = new.replace("acoustic_residual_vector_quantizer", "rvq_rest")
            new = new.replace(".codebook.", "._codebook.").replace("initialized", "_initialized")
            out[new.replace("embed_sum", "embedding_sum")] = t
        else:
            raise ValueError(f"no moshi name for the Mimi tensor {name!r}")
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    for head, parts in qkv.items():
        out[head + "self_attn.in_proj_weight"] = torch.cat(
            [_interleaved(parts["q"], heads), _interleaved(parts["k"], kv_heads), parts["v"]]
        )
    return out
