"""Kyutai's released MoshiVis directory, as downloaded, loaded whole: LM + adapters, SigLIP, Mimi,
tokenizer.

The directory is the model repository ``kyutai/moshika-vis-pytorch-bf16`` exactly as published
(``RELEASE_FILES``), given as a path or found in the local Hugging Face cache by repo id
(``local_files_only``: nothing is ever downloaded). It holds no config: the architecture is read
from the tensors (``release_layout``), the numerics are kyuteye_pt's (the ``moshika-vis``
preset). Before anything large is read, ``load_release`` states the memory it needs and refuses
on a device that cannot hold it. ``write_tiny_release`` writes a tiny random directory in exactly
the released file set, for tests and CI.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moshivis_lab.artefacts import atomic_path
from moshivis_lab.audio.mimi_moshi import MOSHI_MIMI_FILE
from moshivis_lab.config import CHECKPOINT_ENV, RELEASE_REPO, LMConfig, MoshiVisConfig, XAConfig
from moshivis_lab.model.moshivis import MoshiVis
from moshivis_lab.model.release_layout import InferredArchitecture, infer_moshivis_config
from moshivis_lab.model.vis_checkpoint import load_moshivis, to_released_state
from moshivis_lab.vision.config import VisionConfig

HF_REPO = RELEASE_REPO
RELEASE_FILES = {
    "model": "model.safetensors",
    "mimi": MOSHI_MIMI_FILE,
    "tokenizer": "tokenizer_spm_32k_3.model",
}
_SIGLIP_HEAD = 72  # SigLIP-So400m: 1152 wide, 16 heads
_GB = 1e9


def find_release(checkpoint: str | os.PathLike[str] | None = None) -> Path:
    """The released directory: a path, a repo id in the local HF cache, or ``$MOSHIVIS_CHECKPOINT``.

    Raises a ValueError naming the missing files (and how to get them) rather than downloading.
    """
    given = checkpoint if checkpoint is not None else os.environ.get(CHECKPOINT_ENV)
    if not given:
        raise ValueError(
            f"no released checkpoint given: pass checkpoint=DIR (or set {CHECKPOINT_ENV}) to a "
            f"local copy of {HF_REPO} (`huggingface-cli download {HF_REPO} --local-dir DIR`)"
        )
    path = Path(given).expanduser()
    if not path.exists() and "/" in str(given) and len(str(given).split("/")) == 2:
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(given), local_files_only=True))
        except Exception as e:  # noqa: BLE001 - any failure: it is not in the local cache
            raise ValueError(
                f"{given!r} is neither a directory nor a repository in the local Hugging Face "
                f"cache ({type(e).__name__}); download it first: `huggingface-cli download {given}`"
            ) from e
    if not path.is_dir():
        raise ValueError(
            f"{path}: not a directory; give the folder holding {RELEASE_FILES['model']}"
        )
    missing = [name for name in RELEASE_FILES.values() if not (path / name).is_file()]
    if missing:
        raise ValueError(
            f"{path}: not the released file set, missing {missing} (a copy of {HF_REPO} holds "
            f"{sorted(RELEASE_FILES.values())})"
        )
    return path


def vision_config(arch: InferredArchitecture) -> VisionConfig:
    """The SigLIP tower the checkpoint holds, read at kyuteye's size when it is the release's."""
    if arch.vision is None:
        raise ValueError("the checkpoint holds no image encoder (image_prefix.enc.model.*)")
    v = arch.vision
    release = VisionConfig.moshika_vis()
    if all(getattr(release, k) == v[k] for k in v):
        return release
    heads = v["hidden_size"] // _SIGLIP_HEAD if v["hidden_size"] % _SIGLIP_HEAD == 0 else 1
    return VisionConfig(name="released", num_heads=heads, **v)


def _count(path: Path, prefix: str | None = None, skip: str | None = None) -> int:
    with safe_open(str(path), "pt") as f:
        n = 0
        for k in f.keys():
            if (prefix is None or k.startswith(prefix)) and (
                skip is None or not k.startswith(skip)
            ):
                n += int(torch.Size(f.get_slice(k).get_shape()).numel())
    return n


def memory_needed(directory: Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Bytes (in GB) the loaded parts take: LM + adapters and the encoder in ``dtype``, Mimi in
    float32, from the files' headers (nothing is read)."""
    size = torch.empty((), dtype=dtype).element_size()
    model = directory / RELEASE_FILES["model"]
    lm = _count(model, skip="image_prefix.enc.") * size
    enc = _count(model, prefix="image_prefix.enc.") * size
    mimi = _count(directory / RELEASE_FILES["mimi"]) * 4
    parts = {"lm_and_adapters": lm / _GB, "encoder": enc / _GB, "mimi": mimi / _GB}
    parts["total"] = sum(parts.values())
    return parts


def free_memory(device: str | torch.device) -> float | None:
    """GB free on ``device`` (CUDA: the driver's free memory; CPU: MemAvailable), None if unknown."""
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {d} asked for but CUDA is not available on this machine")
        return torch.cuda.mem_get_info(d)[0] / _GB
    if d.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / _GB
        except OSError:
            return None
    return None


def check_fits(needed: dict[str, float], device: str | torch.device, margin: float = 1.1) -> None:
    """Refuse, with the figures, when ``device`` has less free memory than ``margin * needed``."""
    free = free_memory(device)
    if free is not None and needed["total"] * margin > free:
        raise MemoryError(
            f"the released model needs {needed['total']:.1f} GB on {device} (LM + adapters "
            f"{needed['lm_and_adapters']:.1f}, encoder {needed['encoder']:.1f}, Mimi "
            f"{needed['mimi']:.2f}) and {free:.1f} GB is free there; use a GPU with at least "
            f"{needed['total'] * margin:.0f} GB (bf16), or the tiny preset on this machine"
        )


@dataclass
class Release:
    """A loaded released directory: the parts and what was read or assumed about them."""

    directory: Path
    model: MoshiVis
    encoder: Any  # ImageEncoder
    codec: Any  # MimiCodec
    tokenizer: Any  # TextTokenizer
    arch: InferredArchitecture
    needed_gb: dict[str, float]


def load_release(
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    log: Any = print,
) -> Release:
    """Every part of a released directory on ``device``, after checking it fits (see module)."""
    from moshivis_lab.audio.mimi import MimiCodec
    from moshivis_lab.vision.encoder import ImageEncoder
    from moshivis_lab.world.tokenizer import TextTokenizer

    directory = find_release(checkpoint)
    model_file = directory / RELEASE_FILES["model"]
    arch = infer_moshivis_config(model_file, MoshiVisConfig.moshika_vis())
    needed = memory_needed(directory, dtype)
    size = (
        f"{needed['total']:.1f} GB" if needed["total"] >= 0.1 else f"{needed['total'] * 1e3:.1f} MB"
    )
    log(
        f"{directory}: {arch.config.lm.num_layers} layers x {arch.config.lm.dim}; needs {size} on {device} ({dtype})"
    )
    check_fits(needed, device)
    model = load_moshivis(model_file, arch.config, device=device, dtype=dtype)
    vcfg = vision_config(arch)
    encoder = ImageEncoder.from_moshivis_checkpoint(model_file, vcfg, device=device, dtype=dtype)
    codec = MimiCodec(
        directory / RELEASE_FILES["mimi"], num_codebooks=arch.config.lm.dep_q, device=device
    )
    tokenizer = TextTokenizer.load(directory / RELEASE_FILES["tokenizer"])
    if tokenizer.vocab_size != arch.config.lm.text_card:
        raise ValueError(
            f"{directory}: the tokenizer has {tokenizer.vocab_size} pieces but the LM's text "
            f"vocabulary is {arch.config.lm.text_card}: the files are from different models"
        )
    if codec.cardinality != arch.config.lm.card:
        raise ValueError(
            f"{directory}: Mimi has {codec.cardinality} entries per codebook but the LM reads "
            f"{arch.config.lm.card}: the files are from different models"
        )
    return Release(directory, model, encoder, codec, tokenizer, arch, needed)


# ---------------------------------------------------------------------- the tiny fixture

TINY_LM = LMConfig(
    dim=64,
    num_layers=4,
    num_heads=32,
    text_card=1000,
    card=64,
    depformer_dim=32,
    depformer_num_layers=2,
    depformer_num_heads=16,
    depformer_norm="variance",
)
TINY_VISION = VisionConfig(
    name="released",
    image_size=56,
    patch_size=14,
    hidden_size=72,
    num_layers=2,
    num_heads=1,
    intermediate_size=96,
)


def write_tiny_release(
    directory: str | os.PathLike[str], tokenizer: str | os.PathLike[str], seed: int = 0
) -> Path:
    """A tiny random directory in exactly the released file set: ``model.safetensors`` (bf16 LM,
    adapters and a SigLIP tower under ``image_prefix.enc.model.*``), Mimi in the moshi layout
    (``MOSHI_MIMI_FILE``, float32) and the SentencePiece ``tokenizer`` copied under the release's
    name (its vocabulary sets the LM's text vocabulary). Gates are opened so that images matter."""
    from transformers import MimiConfig, MimiModel

    from moshivis_lab.audio.mimi_moshi import to_moshi_state
    from moshivis_lab.vision.encoder import ImageEncoder
    from moshivis_lab.world.tokenizer import TextTokenizer

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab = TextTokenizer.load(tokenizer).vocab_size
    lm = dataclasses.replace(TINY_LM, text_card=vocab)
    xa = dataclasses.replace(XAConfig.moshika_vis(), image_dim=TINY_VISION.hidden_size)
    torch.manual_seed(seed)
    model = MoshiVis(MoshiVisConfig(lm=lm, xa=xa))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name and name.endswith("2.weight"):
                p.normal_(0.0, 2.0)  # gates spread around sigmoid(-4 + noise) instead of 0.018
    state = {k: v.to(torch.bfloat16) for k, v in to_released_state(model).items()}
    encoder = ImageEncoder.from_config(TINY_VISION)
    state.update(
        {
            f"image_prefix.enc.model.{k}": v.to(torch.bfloat16).contiguous()
            for k, v in encoder.model.state_dict().items()
        }
    )
    with atomic_path(out / RELEASE_FILES["model"]) as tmp:
        save_file(state, str(tmp))
    mimi = MimiModel(
        MimiConfig(
            hidden_size=64,
            num_filters=4,
            codebook_size=lm.card,
            codebook_dim=16,
            vector_quantization_hidden_dimension=16,
            num_quantizers=lm.dep_q,
            upsample_groups=64,
            num_hidden_layers=1,
            intermediate_size=96,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=64,
        )
    )
    with torch.no_grad():
        for name, t in mimi.state_dict().items():
            if name.endswith("embed_sum"):
                t.normal_()
            elif name.endswith("cluster_usage"):
                t.fill_(1.0)
            elif name.endswith("initialized"):
                t.fill_(1.0)
    with atomic_path(out / RELEASE_FILES["mimi"]) as tmp:
        save_file(to_moshi_state(mimi), str(tmp))
    with atomic_path(out / RELEASE_FILES["tokenizer"]) as tmp:
        shutil.copyfile(tokenizer, tmp)
    return out
