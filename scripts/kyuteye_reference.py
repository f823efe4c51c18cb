"""Write the reference data the lab's kyuteye-parity tests compare against, using Kyutai's own
PyTorch code (``kyuteye_pt`` of kyutai-labs/moshivis), as a new user would run it.

It needs a checkout of kyutai-labs/moshivis (``--kyuteye DIR/kyuteye_pt``) and the ``moshi``
package; torchvision is not needed (only kyuteye's image transforms import it; they are not run).
Writes into ``tests/data/kyuteye/``:

- ``moshika_vis_tensors.json``: the name, shape and dtype of every tensor of the released
  moshika-vis model as kyuteye's code builds it from ``configs/moshika-vis.yaml`` (on the meta
  device), with the shared cross-attention projections kept once (under layer 0), as in the
  released ``model.safetensors``; the SigLIP tower's tensors are listed apart.
- ``tiny/model.safetensors``: a tiny random kyuteye MoshiVis saved with ``safetensors.torch.
  save_model`` (which keeps a shared tensor once) plus the image prefix's ``proj_xa``/``norm_xa``.
- ``tiny/reference.safetensors``: fixed inputs and kyuteye's outputs on them (float32, eval,
  its streaming path step by step): the image tokens after ``norm_xa``, text logits, every
  depformer step's logits, the reported gate value per step; ``tiny/config.json`` holds the kyuteye constructor arguments used.

Usage: ``python scripts/kyuteye_reference.py --kyuteye /path/to/moshivis/kyuteye_pt``
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "kyuteye"

# The tiny model: every MoshiConfig / fuse field kyuteye's MoshiVis takes, at toy sizes.
TINY = {
    "dim": 64,
    "text_card": 40,
    "padding_token_id": 3,
    "n_q": 8,
    "dep_q": 4,
    "audio_card": 32,
    "num_heads": 4,
    "num_layers": 4,
    "hidden_scale": 4.125,
    "causal": True,
    "context": 3000,
    "max_period": 10000,
    "gating": True,
    "activation": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer": True,
    "depformer_dim": 32,
    "depformer_dim_feedforward": int(4.125 * 32),
    "depformer_num_heads": 2,
    "depformer_num_layers": 2,
    "depformer_multi_linear": True,
    "depformer_context": 8,
    "depformer_gating": True,
    "depformer_activation": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 0, 1, 1, 1],
    "xa_dim": None,
    "cross_attention": True,
    "xa_layers": [],
    "xa_gating": "sigmoid",
    "xa_conditional_gating": True,
    "xa_shared": True,
    "xa_gate_shared": False,
    "xa_start": "start",
    "xa_end": "end",
    "xa_step": 1,
    "xa_delay": 0,
}
BATCH, STEPS, IMAGE_TOKENS = 2, 7, 16


def import_kyuteye(root: Path) -> types.SimpleNamespace:
    """kyuteye's modules, importable without torchvision (its image transforms are stubbed)."""
    if not (root / "kyuteye" / "models" / "moshivis.py").exists():
        sys.exit(f"{root} is not kyutai-labs/moshivis' kyuteye_pt directory")
    sys.path.insert(0, str(root))
    import moshivis_lab  # noqa: F401  (stubs a torchaudio without a CPU build)

    stub = types.ModuleType("kyuteye.modules.image_transforms")

    class _Identity:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, x):
            return x

    stub.Normalize = stub.PixtralNormalize = stub.SigLIPNormalize = _Identity
    sys.modules["kyuteye.modules.image_transforms"] = stub
    import transformers

    if not hasattr(transformers.SiglipVisionModel, "vision_model"):
        # transformers >= 5 made SiglipVisionModel the tower itself; kyuteye reads .vision_model
        transformers.SiglipVisionModel.vision_model = property(lambda self: self)
    from kyuteye.config.kyuteye_config import KyuteyeConfig
    from kyuteye.models.image_projection import ImageProjection
    from kyuteye.models.moshivis import MoshiVis
    from kyuteye.modules import cross_attention

    return types.SimpleNamespace(
        KyuteyeConfig=KyuteyeConfig,
        ImageProjection=ImageProjection,
        MoshiVis=MoshiVis,
        shared=cross_attention.SharedModuleType,
    )


def released_tensors(ky: types.SimpleNamespace, yaml: Path) -> dict:
    """Names, shapes and dtypes of the released model as kyuteye builds it (meta device)."""
    cfg = ky.KyuteyeConfig.from_yml(yaml)
    ky.shared._instances.clear()  # kyuteye's shared modules are process-wide singletons
    with torch.device("meta"):
        # get_moshi_vis casts the whole model to its dtype (some layers are built in float32)
        model = ky.MoshiVis(**cfg.moshi_constructor_kwargs, dtype=torch.bfloat16).to(torch.bfloat16)
    # The image prefix builds a real SigLIP on the CPU (kyuteye moves it there).
    prefix = ky.ImageProjection(cfg, model.llm.dim, load_pretrained_encoder=False)
    lm, encoder = {}, {}
    for name, t in model.state_dict().items():
        if "cross_attention.mha." in name and ".layers.0." not in name:
            continue  # the shared projections: one tensor, stored once
        lm[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    for name, t in prefix.state_dict().items():
        entry = {"shape": list(t.shape), "dtype": "bfloat16"}
        (encoder if name.startswith("enc.") else lm)["image_prefix." + name] = entry
    return {
        "source": "kyutai-labs/moshivis kyuteye_pt, configs/moshika-vis.yaml",
        "written_by": "scripts/kyuteye_reference.py",
        "tensors": lm,
        "encoder_tensors": encoder,
    }


def delayed_grid(codes: torch.Tensor, delays: list[int], initial: torch.Tensor) -> torch.Tensor:
    """Row k shifted right by delays[k], the first delays[k] steps holding the initial token."""
    out = initial[None, :, None].expand_as(codes).clone()
    for k, d in enumerate(delays):
        out[:, k, d:] = codes[:, k, : codes.shape[2] - d]
    return out


def tiny_reference(ky: types.SimpleNamespace, yaml: Path, out: Path) -> None:
    """A tiny random kyuteye model, its file, fixed inputs and kyuteye's outputs on them."""
    torch.manual_seed(0)
    ky.shared._instances.clear()
    model = ky.MoshiVis(**TINY, dtype=torch.float32).eval()
    cfg = ky.KyuteyeConfig.from_yml(yaml)
    prefix = ky.ImageProjection(cfg, TINY["dim"], load_pretrained_encoder=False).eval()
    with torch.no_grad():
        # Move every norm's alpha and the gates off their init so each one matters.
        for name, p in list(model.named_parameters()) + list(prefix.named_parameters()):
            if name.endswith(".alpha") and p.dim() == 3:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "cross_attention.gate.alpha" in name:
                p.mul_(8.0)  # gates spread over (0, 1) instead of sitting at sigmoid(-4)
            elif "cross_attention.mha.out_proj" in name:
                p.mul_(4.0)
        prefix.proj_xa.bias.copy_(torch.randn_like(prefix.proj_xa.bias))
    encoded = torch.randn(BATCH, IMAGE_TOKENS, prefix.encoder_out_dim)
    k = 1 + TINY["n_q"]
    codes = torch.empty(BATCH, k, STEPS, dtype=torch.long)
    codes[:, 0] = torch.randint(0, TINY["text_card"], (BATCH, STEPS))
    codes[:, 1:] = torch.randint(0, TINY["audio_card"], (BATCH, k - 1, STEPS))
    initial = torch.tensor([TINY["text_card"]] + [TINY["audio_card"]] * TINY["n_q"])
    delayed = delayed_grid(codes, TINY["delays"], initial)
    inputs = torch.cat([initial[None, :, None].expand(BATCH, k, 1), delayed[:, :, :-1]], dim=2)
    q = TINY["dep_q"]
    with torch.no_grad():
        image = prefix.project_xa(encoded)
        # kyuteye's PyTorch code is for streaming inference: its full-sequence forward applies
        # no causal mask. So the reference is its streaming path, one step at a time, as its
        # server runs it (text logits and gate per step; the depformer over codebooks).
        text_logits = torch.empty(BATCH, STEPS, TINY["text_card"])
        blind_logits = torch.empty_like(text_logits)
        audio = torch.empty(BATCH, q, STEPS, TINY["audio_card"])
        gate = torch.empty(STEPS)
        no_image_gate = torch.empty(STEPS)
        for src, logits_out, gate_out in (
            (image, text_logits, gate),
            (None, blind_logits, no_image_gate),
        ):
            with model.streaming():
                for s in range(STEPS):
                    h, tl, g = model.forward_text(inputs[:, :, s : s + 1], cross_attention_src=src)
                    logits_out[:, s] = tl[:, 0, 0]
                    gate_out[s] = float(g)
                    if src is None:
                        continue
                    with model.depformer.streaming():
                        for cb in range(q):
                            logits = model.forward_depformer(
                                cb, delayed[:, cb : cb + 1, s : s + 1], h
                            )
                            audio[:, cb, s] = logits[:, 0, 0]
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file, save_model

    save_model(model, str(out / "lm.safetensors"))
    from safetensors.torch import load_file

    state = load_file(str(out / "lm.safetensors"))
    state.update(
        {"image_prefix." + n: t for n, t in prefix.state_dict().items() if not n.startswith("enc.")}
    )
    (out / "lm.safetensors").unlink()
    save_file(state, str(out / "model.safetensors"))
    save_file(
        {
            "codes": codes,
            "encoded": encoded,
            "image": image.contiguous(),
            "text_logits": text_logits,
            "audio_logits": audio,
            "gate": gate,
            "gate_without_image": no_image_gate,
        },
        str(out / "reference.safetensors"),
    )
    (out / "config.json").write_text(json.dumps(TINY, indent=1) + "\n")
    effect = float((text_logits - blind_logits).abs().max())
    print(
        f"wrote {out}: {len(state)} tensors; reported gate {float(gate.mean()):.4f}; "
        f"the image moves the text logits by up to {effect:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kyuteye", type=Path, required=True, help="kyuteye_pt directory")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    ky = import_kyuteye(args.kyuteye.resolve())
    yaml = args.kyuteye / "configs" / "moshika-vis.yaml"
    names = released_tensors(ky, yaml)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moshika_vis_tensors.json").write_text(json.dumps(names, indent=1) + "\n")
    print(f"{len(names['tensors'])} model tensors, {len(names['encoder_tensors'])} encoder tensors")
    tiny_reference(ky, yaml, args.out / "tiny")


if __name__ == "__main__":
    main()
