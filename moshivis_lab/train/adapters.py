"""Single-stage MoshiVis training: a frozen speech LM and a frozen image encoder, trained adapters.

One entry point, ``train_adapters``, does what the paper does on one GPU and what our tiny preset
does on a laptop CPU:

1. build what is missing (world data, the speech LM, the vision encoder),
2. cache the frozen encoder's image tokens once per split (``image_tokens.image_table``),
3. wrap the LM in ``MoshiVis``, freeze everything, **assert zero trainable parameters**, unfreeze
   exactly the adapters (optionally LoRA on the LM through peft), print the counts,
4. train on mixed batches (``mix.MixedData``: speech with probability ``p_audio``, speechless
   otherwise, unrelated chit-chat glued with ``p_concat``) with AdamW, warmup + cosine, gradient
   accumulation and clipping, under ``accelerate`` (device auto-detected, bf16 autocast on CUDA,
   DDP under ``accelerate launch`` unchanged),
5. log JSONL metrics, checkpoint adapters + optimizer (safetensors / weights-only) and resume.

Outputs live in ``data/<preset>/adapters/<run>/``: ``adapters.safetensors`` (final), ``ckpt/``,
``state.json``, ``metrics.jsonl``, ``train_report.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moshivis_lab.artefacts import (
    Stage,
    atomic_path,
    claim_run_dir,
    config_hash,
    keep_metrics_upto,
    read_json,
    save_run_checkpoint,
    trained_settings,
)
from moshivis_lab.artefacts import write_json as _write_json
from moshivis_lab.config import ZERO_TOKEN, LabConfig, XAConfig, _check, _check_types, from_stored
from moshivis_lab.train.guard import check_finite
from moshivis_lab.train.image_tokens import IMAGE_TOKEN_SOURCES
from moshivis_lab.train.mix import Batch, MixConfig, MixedData, batch_for_step
from moshivis_lab.train.pretrain import lr_at

LOSS_KEYS = ("loss", "text_loss", "audio_loss", "speech_text_loss", "speechless_text_loss")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of adapter training (validated on construction)."""

    steps: int = 800
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    gate_lr_scale: float = 1.0  # the gate MLPs' learning rate, as a multiple of lr
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    mix: MixConfig = field(default_factory=MixConfig)
    xa: XAConfig | None = None  # None: XAConfig.tiny sized to the LM and the encoder
    # where the adapters' image tokens come from: "encoder" (the frozen encoder, the method) or
    # "oracle" (symbolic tokens read off the scene graph: an upper-bound ablation, vision/oracle.py)
    image_tokens: str = "encoder"
    lora_rank: int = 0  # > 0: LoRA on the LM's temporal attention and FFN through peft
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("in_projs", "out_projs", "linear_in", "linear_out")
    eval_interval: int = 100
    eval_batches: int = 4
    ckpt_interval: int = 100
    log_interval: int = 10
    minutes: float = 9.5  # wall-clock budget of one invocation; stops (resumably) when spent
    threads: int = 2

    def __post_init__(self) -> None:
        _check_types(self)  # a value of the wrong kind fails here, the field named
        name = "TrainConfig"
        for n in ("steps", "batch_size", "grad_accum", "eval_interval", "eval_batches"):
            v = getattr(self, n)
            _check(v >= 1, name, n, f"must be >= 1, got {v}")
        for n in ("ckpt_interval", "log_interval", "threads"):
            v = getattr(self, n)
            _check(v >= 1, name, n, f"must be >= 1, got {v}")
        _check(self.lr > 0, name, "lr", f"must be > 0, got {self.lr}")
        _check(
            self.gate_lr_scale > 0,
            name,
            "gate_lr_scale",
            f"must be > 0, got {self.gate_lr_scale}",
        )
        _check(self.minutes > 0, name, "minutes", f"must be > 0, got {self.minutes}")
        _check(
            0 <= self.warmup_steps <= self.steps,
            name,
            "warmup_steps",
            f"must be in [0, steps={self.steps}], got {self.warmup_steps}",
        )
        _check(0 <= self.min_lr_ratio <= 1, name, "min_lr_ratio", "must be in [0, 1]")
        _check(self.weight_decay >= 0, name, "weight_decay", "must be >= 0")
        _check(self.grad_clip > 0, name, "grad_clip", f"must be > 0, got {self.grad_clip}")
        _check(self.lora_rank >= 0, name, "lora_rank", f"must be >= 0, got {self.lora_rank}")
        _check(
            self.image_tokens in IMAGE_TOKEN_SOURCES,
            name,
            "image_tokens",
            f"must be one of {IMAGE_TOKEN_SOURCES}, got {self.image_tokens!r}",
        )
        for n in ("beta1", "beta2"):
            v = getattr(self, n)
            _check(0.0 <= v < 1.0, name, n, f"must be in [0, 1), got {v}")
        if not isinstance(self.mix, MixConfig):
            raise TypeError(f"TrainConfig.mix must be a MixConfig, got {type(self.mix).__name__}")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls) -> TrainConfig:
        """The tiny preset: 800 steps of 16 samples of the answer-dense mix
        (``MixConfig.answer_dense``); the adapters start at ``XAConfig.tiny``'s init."""
        return cls(mix=MixConfig.answer_dense())

    @classmethod
    def smoke(cls) -> TrainConfig:
        """A few seconds of training for tests and notebook CI."""
        return cls(
            steps=6,
            batch_size=4,
            warmup_steps=2,
            eval_interval=3,
            eval_batches=1,
            ckpt_interval=3,
            log_interval=1,
            minutes=3.0,
            mix=MixConfig.answer_dense().replace(speech_len=48, text_len=48),
        )


def adapters_dir(cfg: LabConfig, run: str = "main") -> Path:
    """Where an adapter run's checkpoints, metrics and final weights live."""
    if not run or "/" in run or run.startswith("."):
        raise ValueError(f"run name must be a plain directory name, got {run!r}")
    return cfg.data_dir / cfg.name / "adapters" / run


# ---------------------------------------------------------------------- the loss


def loss_sums(model: Any, batch: Batch, out: Any) -> dict[str, torch.Tensor]:
    """Weighted CE sums and weight totals of one forward (numerators keep the graph)."""
    cfg = model.lm.cfg
    codes = batch.codes
    mask = out.text_mask[:, 0]
    target = codes[:, 0].clamp_min(0)
    ce = F.cross_entropy(out.text_logits[:, 0].float().transpose(1, 2), target, reduction="none")
    pad = (target == cfg.existing_text_padding_id) | (target == cfg.existing_text_end_padding_id)
    w = torch.where(pad, cfg.text_padding_weight, 1.0) * batch.text_weight * mask
    ce = torch.where(w > 0, ce, 0.0)  # masked positions may hold NaN logits
    sums = {"text": (ce * w).sum(), "text_w": w.sum().detach()}
    sp = batch.is_speech[:, None].float()
    for name, sel in (("speech_text", sp), ("speechless_text", 1 - sp)):
        sums[name] = (ce * w * sel).sum().detach()
        sums[f"{name}_w"] = (w * sel).sum().detach()
    q = cfg.dep_q
    amask = out.mask
    if amask.any():
        atarget = codes[:, 1 : 1 + q][amask]
        ace = F.cross_entropy(out.logits[amask].float(), atarget, reduction="none")
        book = torch.arange(q, device=codes.device)[None, :, None].expand_as(amask)[amask]
        aw = torch.where(book == 0, cfg.semantic_weight, 1.0)
        sums["audio"], sums["audio_w"] = (ace * aw).sum(), aw.sum().detach()
    else:
        sums["audio"] = sums["audio_w"] = ce.new_zeros(())
    return sums


def combine_sums(
    model: Any, sums: list[dict[str, torch.Tensor]], distributed: bool = False
) -> dict[str, torch.Tensor]:
    """Moshi's weighted text + audio loss from the sums of several forwards (one batch).

    ``distributed``: this process holds one shard of a data-parallel batch (see
    ``global_loss``).
    """
    cfg = model.lm.cfg
    tot = {k: sum(s[k] for s in sums) for k in sums[0]}
    if distributed and _world_size() > 1:
        return global_loss(cfg, tot)

    def mean(k: str) -> torch.Tensor:
        return tot[k] / torch.as_tensor(tot[f"{k}_w"]).clamp_min(1e-12)

    text_loss, audio_loss = mean("text"), mean("audio")
    return {
        "loss": cfg.text_weight * text_loss + cfg.audio_weight * audio_loss,
        "text_loss": text_loss,
        "audio_loss": audio_loss,
        "speech_text_loss": mean("speech_text"),
        "speechless_text_loss": mean("speechless_text"),
    }


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_loss(cfg: Any, tot: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Data parallel: the loss of the whole (all-process) batch, from this process' sums.

    Weight totals and (detached) numerators are summed over processes. The returned ``loss``
    has the global value, and its gradient is ``world_size`` times this shard's numerators over
    the global weights, so that DDP's mean of the processes' gradients is exactly the gradient
    of the global loss (one process with the same global batch gives the same update).
    """
    keys = sorted(tot)
    ref = next(v for v in tot.values() if isinstance(v, torch.Tensor))
    local = torch.stack([torch.as_tensor(tot[k], device=ref.device).detach().float() for k in keys])
    torch.distributed.all_reduce(local)
    glob = dict(zip(keys, local, strict=True))
    world = _world_size()

    def mean(k: str) -> torch.Tensor:
        return glob[k] / glob[f"{k}_w"].clamp_min(1e-12)

    def share(k: str) -> torch.Tensor:
        return world * tot[k] / glob[f"{k}_w"].clamp_min(1e-12)

    value = cfg.text_weight * mean("text") + cfg.audio_weight * mean("audio")
    objective = cfg.text_weight * share("text") + cfg.audio_weight * share("audio")
    return {
        "loss": objective + (value - objective).detach(),
        "text_loss": mean("text"),
        "audio_loss": mean("audio"),
        "speech_text_loss": mean("speech_text"),
        "speechless_text_loss": mean("speechless_text"),
    }


def shard_batch(batch: Batch, rank: int, world: int) -> Batch:
    """Process ``rank``'s rows of a global batch: the ``rank``-th of ``world`` equal slices."""
    b = batch.codes.shape[0]
    if b % world:
        raise ValueError(f"batch_size {b} must be divisible by the {world} processes")
    n = b // world
    fields = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    return Batch(*(t[rank * n : (rank + 1) * n] for t in fields))


def split_batch(batch: Batch) -> list[Batch]:
    """Speech and speechless rows as two batches, each cut to its own longest sample.

    Speechless samples are short and have no audio target: alone they skip the depformer and
    most of the padding, which makes a mixed step several times cheaper on a CPU.
    """
    parts = []
    for sel in (batch.is_speech, ~batch.is_speech):
        if not bool(sel.any()):
            continue
        idx = sel.nonzero()[:, 0]
        codes = batch.codes[idx]
        used = (codes != ZERO_TOKEN).any(dim=1).any(dim=0)
        t = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
        parts.append(
            Batch(
                codes[..., :t],
                batch.text_weight[idx, :t],
                batch.relevance[idx, :t],
                batch.image_index[idx],
                batch.is_speech[idx],
                batch.assistant[idx, :t],
            )
        )
    return parts


def batch_loss(
    model: Any,
    batch: Batch,
    table: torch.Tensor,
    *,
    forward: Any = None,
    split: bool = True,
    distributed: bool = False,
) -> dict[str, torch.Tensor]:
    """The loss parts of a mixed batch.

    ``split`` forwards the speech and speechless rows separately (see ``split_batch``); under
    DDP (several processes) pass ``split=False`` so that each step has exactly one forward,
    and ``distributed=True`` when ``batch`` is this process' shard of a global batch (the loss
    is then normalised over the global batch, see ``global_loss``). ``forward`` is the module
    to call (the DDP wrapper), ``model`` the bare ``MoshiVis``.
    """
    forward = forward if forward is not None else model
    sums = []
    for part in split_batch(batch) if split else [batch]:
        tokens = table[part.image_index.cpu()].to(part.codes.device)
        sums.append(loss_sums(model, part, forward(part.codes, image_tokens=tokens)))
    return combine_sums(model, sums, distributed=distributed)


# ---------------------------------------------------------------------- building the model


def build_model(
    cfg: LabConfig, xa: XAConfig | None = None, lm: Any = None, image_dim: int | None = None
) -> Any:
    """``MoshiVis`` around the pretrained speech LM of ``cfg`` with fresh adapters."""
    from moshivis_lab.model.moshivis import MoshiVis
    from moshivis_lab.train.pretrain import load_speech_lm

    lm = lm if lm is not None else load_speech_lm(cfg)
    if xa is None:
        if image_dim is None:
            from moshivis_lab.vision.pretrain import load_vision_encoder

            image_dim = load_vision_encoder(cfg).hidden_size
        xa = XAConfig.tiny(lm.cfg, image_dim)
    return MoshiVis.from_lm(lm, xa)


def freeze_and_unfreeze(model: Any, tcfg: TrainConfig, log: Any = print) -> dict[str, int]:
    """Freeze all, assert nothing trains, unfreeze exactly the adapters (+ LoRA); the counts."""
    from moshivis_lab.model.moshivis import freeze_for_adapters

    counts = dict(freeze_for_adapters(model))
    if tcfg.lora_rank > 0:
        counts["lora"] = add_lora(model, tcfg)
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts["model_total"] = sum(p.numel() for p in model.parameters())
    log("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return counts


def add_lora(model: Any, tcfg: TrainConfig) -> int:
    """LoRA (peft) on the temporal transformer's linears named in ``lora_targets``; its count."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = sorted(
        {
            name
            for name, mod in model.lm.transformer.named_modules()
            if isinstance(mod, torch.nn.Linear)
            and set(name.split(".")) & set(tcfg.lora_targets)
            and "cross_attention" not in name.split(".")  # the adapters stay full-rank
        }
    )
    if not targets:
        raise ValueError(
            f"no nn.Linear in the LM's temporal transformer is named one of {tcfg.lora_targets}"
        )
    before = {id(p) for p in model.parameters()}
    lcfg = LoraConfig(r=tcfg.lora_rank, lora_alpha=tcfg.lora_alpha, target_modules=targets)
    inject_adapter_in_model(lcfg, model.lm.transformer)
    n = 0
    for p in model.parameters():
        if id(p) not in before:
            p.requires_grad_(True)
            n += p.numel()
    from moshivis_lab.model.moshivis import adapter_parameters

    for p in adapter_parameters(model):  # peft freezes what it wraps: keep the adapters trainable
        p.requires_grad_(True)
    return n


# ---------------------------------------------------------------------- training loop


def _run_key(cfg: LabConfig, model: Any, tcfg: TrainConfig, lm_sha: str, encoder: Any) -> str:
    """What makes a run: data, LM, encoder weights, adapter config, hyper-parameters."""
    from moshivis_lab.train.image_tokens import encoder_key

    trained = trained_settings(tcfg)
    xa = model.cfg.xa
    from moshivis_lab.train.mix import SPEECHLESS_FORMAT

    return config_hash(
        cfg.world,
        cfg.codec,
        cfg.tokenizer,
        xa,
        trained,
        lm_sha,
        encoder_key(encoder),
        {"speechless_format": SPEECHLESS_FORMAT},
    )


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if n in names}


def _save(
    out: Path, model: Any, opt: torch.optim.Optimizer, step: int, elapsed: float, key: str
) -> None:
    """The step's adapter weights + optimizer, then ``state.json`` pointing at them."""
    from safetensors.torch import save_file

    def write(path: Path) -> None:
        with atomic_path(path) as tmp:
            save_file(_trainable_state(model), str(tmp))

    save_run_checkpoint(
        out,
        step=step,
        elapsed=elapsed,
        key=key,
        optimizer=opt,
        write_weights=write,
        prefix="adapters",
    )


def load_trainable(model: Any, path: Path) -> None:
    """Load a trainable-parameter file into ``model`` (strict on names and shapes)."""
    from safetensors.torch import load_file

    from moshivis_lab.model.checkpoint import _open, check_values

    path, _, _ = _open(path)  # missing file, directory, pickle or damaged file: a clear error
    state = load_file(str(path))
    check_values(state, str(path))  # a diverged run's NaN weights are refused, not copied in
    own = dict(model.named_parameters())
    missing = sorted(n for n, p in own.items() if p.requires_grad and n not in state)
    unexpected = sorted(n for n in state if n not in own)
    shapes = sorted(
        f"{n}: file {tuple(t.shape)} vs model {tuple(own[n].shape)}"
        for n, t in state.items()
        if n in own and tuple(t.shape) != tuple(own[n].shape)
    )
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"mis-shaped {shapes[:8]}; was it written by another adapter configuration?"
        )
    with torch.no_grad():
        for n, t in state.items():
            own[n].copy_(t)


@torch.no_grad()
def eval_loss(
    model: Any, batches: list[Batch], table: torch.Tensor, device: Any
) -> dict[str, float]:
    """Mean loss parts over fixed batches (no gradient)."""
    model.eval()
    sums = dict.fromkeys(LOSS_KEYS, 0.0)
    for b in batches:
        b = b.to(device)
        parts = batch_loss(model, b, table)
        for k in LOSS_KEYS:
            sums[k] += float(parts[k])
    return {k: v / max(1, len(batches)) for k, v in sums.items()}


def train_adapters(
    cfg: LabConfig,
    tcfg: TrainConfig,
    *,
    run: str = "main",
    progress: bool = True,
    max_new_steps: int | None = None,
    overwrite: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """Train (or resume, or skip when finished) the adapters of run ``run``; return its report.

    ``max_new_steps`` stops this invocation after that many updates (checkpointed, resumable).
    A run directory made with other settings raises a ValueError unless ``overwrite``. Torch's
    thread count is set to ``tcfg.threads`` for the run and restored afterwards.
    """
    before = torch.get_num_threads()
    try:
        return _train_adapters(
            cfg,
            tcfg,
            run=run,
            progress=progress,
            max_new_steps=max_new_steps,
            overwrite=overwrite,
            log=log,
        )
    finally:
        torch.set_num_threads(before)


def _train_adapters(
    cfg: LabConfig,
    tcfg: TrainConfig,
    *,
    run: str = "main",
    progress: bool = True,
    max_new_steps: int | None = None,
    overwrite: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    from accelerate import Accelerator

    from moshivis_lab.train.image_tokens import split_tokens
    from moshivis_lab.train.pretrain import speech_lm_dir
    from moshivis_lab.vision.pretrain import load_vision_encoder

    if max_new_steps is not None and max_new_steps < 1:
        raise ValueError(f"max_new_steps must be >= 1, got {max_new_steps}")
    torch.set_num_threads(tcfg.threads)
    out = adapters_dir(cfg, run)
    encoder = load_vision_encoder(cfg)
    train = MixedData(cfg, "train", tcfg.mix)
    val = MixedData(cfg, "val", tcfg.mix)
    torch.manual_seed(tcfg.seed)
    model = build_model(cfg, tcfg.xa, image_dim=encoder.hidden_size)
    lm_file = speech_lm_dir(cfg) / "model.safetensors"
    lm_sha = (
        read_json(speech_lm_dir(cfg) / ".pretrain.done.json").get("key", "")
        if lm_file.exists()
        else ""
    )
    key = _run_key(cfg, model, tcfg, lm_sha, encoder)
    stage = Stage(out, "adapters", key)
    state_path, metrics_path = out / "state.json", out / "metrics.jsonl"
    claim_run_dir(
        out,
        key,
        overwrite,
        stage=stage,
        how="pass overwrite=True (CLI: --overwrite) or another run name to start again",
    )
    if stage.done and (out / "adapters.safetensors").exists():
        return stage.info()
    counts = freeze_and_unfreeze(model, tcfg, log=log if progress else (lambda *_: None))
    if counts["trainable"] == 0:
        raise RuntimeError("no trainable parameters after unfreezing the adapters")

    tables = {
        name: split_tokens(cfg, d.image_ids, encoder, name, progress, tcfg.image_tokens)
        for name, d in (("train", train), ("val", val))
    }
    del encoder
    accel = Accelerator(
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        gradient_accumulation_steps=tcfg.grad_accum,
        cpu=not torch.cuda.is_available(),
    )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = []
    for is_gate in (False, True):
        for decays in (True, False):
            ps = [
                p
                for n, p in named
                if (".gate." in n or n.startswith("gate.")) == is_gate and (p.dim() >= 2) == decays
            ]
            if ps:
                groups.append(
                    {
                        "params": ps,
                        "weight_decay": tcfg.weight_decay if decays else 0.0,
                        "lr_scale": tcfg.gate_lr_scale if is_gate else 1.0,
                    }
                )
    opt = torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
    step, elapsed_before = 0, 0.0
    if state_path.exists():
        st = read_json(state_path)
        load_trainable(model, out / "ckpt" / st["model"])
        blob = torch.load(out / "ckpt" / st["optim"], weights_only=True)
        opt.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"])
        step, elapsed_before = int(st["step"]), float(st["elapsed_s"])
        keep_metrics_upto(metrics_path, step)
    elif metrics_path.exists():
        metrics_path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    model, opt = accel.prepare(model, opt)
    core = accel.unwrap_model(model)
    device = accel.device
    val_batches = [
        batch_for_step(val, tcfg.batch_size, tcfg.seed + 10**6, i) for i in range(tcfg.eval_batches)
    ]
    t_start = time.time()
    stop_at = tcfg.steps if max_new_steps is None else min(tcfg.steps, step + max_new_steps)
    recent: list[dict[str, float]] = []
    last_val: dict[str, float] | None = None
    stopped = "steps"
    bar = tqdm(total=tcfg.steps, initial=step, disable=not progress, desc=f"train adapters [{run}]")
    with open(metrics_path, "a", encoding="utf-8") as mf:
        while step < stop_at:
            if time.time() - t_start >= tcfg.minutes * 60:
                stopped = "time budget"
                break
            t0 = time.time()
            lr = lr_at(step, tcfg)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            model.train()
            acc: dict[str, float] = dict.fromkeys(LOSS_KEYS, 0.0)
            norm: Any = 0.0
            for micro in range(tcfg.grad_accum):
                b = batch_for_step(train, tcfg.batch_size, tcfg.seed, step, micro)
                if accel.num_processes > 1:  # data parallel: this process' rows of the batch
                    b = shard_batch(b, accel.process_index, accel.num_processes)
                b = b.to(device)
                with accel.accumulate(model), accel.autocast():
                    parts = batch_loss(
                        core,
                        b,
                        tables["train"],
                        forward=model,
                        split=accel.num_processes == 1,
                        distributed=accel.num_processes > 1,
                    )
                    check_finite(
                        "adapter training", step + 1, {"loss": parts["loss"].detach()},
                        train.last_ids, out,
                    )  # fmt: skip
                    accel.backward(parts["loss"])
                    if accel.sync_gradients:
                        norm = accel.clip_grad_norm_(params, tcfg.grad_clip)
                        check_finite(
                            "adapter training", step + 1, {"grad_norm": norm}, train.last_ids, out
                        )
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                for k in LOSS_KEYS:
                    acc[k] += float(parts[k].detach()) / tcfg.grad_accum
            step += 1
            rec = {**acc, "grad_norm": float(norm), "lr": lr}
            recent = (recent + [rec])[-20:]
            bar.update(1)
            bar.set_postfix(loss=f"{acc['loss']:.3f}", text=f"{acc['speechless_text_loss']:.2f}")
            elapsed = elapsed_before + time.time() - t_start
            if accel.is_main_process and (step % tcfg.log_interval == 0 or step == stop_at):
                line = {
                    "step": step,
                    "split": "train",
                    **rec,
                    "step_s": time.time() - t0,
                    "elapsed_s": elapsed,
                }
                mf.write(json.dumps(line) + "\n")
                mf.flush()
            if step % tcfg.eval_interval == 0 or step == tcfg.steps:
                last_val = eval_loss(core, val_batches, tables["val"], device)
                if accel.is_main_process:
                    mf.write(
                        json.dumps({"step": step, "split": "val", **last_val, "elapsed_s": elapsed})
                        + "\n"
                    )
                    mf.flush()
            if accel.is_main_process and step % tcfg.ckpt_interval == 0 and step < stop_at:
                _save(out, core, opt, step, elapsed, key)
    bar.close()
    elapsed = elapsed_before + time.time() - t_start
    if not accel.is_main_process:
        return {}
    _save(out, core, opt, step, elapsed, key)
    finished = step >= tcfg.steps
    report: dict[str, Any] = {
        "run": run,
        "step": step,
        "steps": tcfg.steps,
        "finished": finished,
        "stopped_by": stopped if not finished else "steps",
        "elapsed_s": round(elapsed, 2),
        "device": str(device),
        "parameters": counts,
        "train_loss_last20": (
            {k: float(np.mean([r[k] for r in recent])) for k in LOSS_KEYS} if recent else None
        ),
        "val_loss": last_val,
        "dir": str(out),
        "config": json.loads(json.dumps(dataclasses.asdict(tcfg), default=str)),
    }
    if finished:
        from safetensors.torch import save_file

        with atomic_path(out / "adapters.safetensors") as tmp:
            save_file(_trainable_state(core), str(tmp))
        _write_json(out / "train_report.json", report)
        return stage.finish(**report)
    return report


def load_trained(cfg: LabConfig, run: str = "main", tcfg: TrainConfig | None = None) -> Any:
    """The trained ``MoshiVis`` of run ``run`` (final weights, else the latest checkpoint)."""
    out = adapters_dir(cfg, run)
    report = out / "train_report.json"
    tcfg = tcfg or TrainConfig.tiny()
    if report.exists():
        stored = read_json(report)
        if not isinstance(stored, dict) or "config" not in stored:
            raise ValueError(f"{report} holds no 'config'; delete the run and train it again")
        tcfg = from_stored(TrainConfig, stored["config"], f"{report} [config]")
    model = build_model(cfg, tcfg.xa)
    freeze_and_unfreeze(model, tcfg, log=lambda *_: None)
    path = out / "adapters.safetensors"
    if not path.exists() and (out / "state.json").exists():
        path = out / "ckpt" / read_json(out / "state.json")["model"]
    if not path.exists():
        raise FileNotFoundError(
            f"no trained adapters under {out}; run `moshivis-lab train --preset {cfg.name}`"
        )
    load_trainable(model, path)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def ensure_pretrained(cfg: LabConfig, progress: bool = True) -> dict[str, Any]:
    """Build whatever the adapters need and is missing: world data, speech LM, image encoder.

    The shipped bases (``bases.install_bases``) are installed first where their recipe is the
    code's; every part is then skipped when already built (its stage stamp matches). The smoke
    preset uses the smoke trainers and a smaller vision tower (``bases.base_configs``), so that
    CI and notebooks run in seconds.
    """
    from moshivis_lab.bases import base_configs, install_bases
    from moshivis_lab.pipeline import build_data
    from moshivis_lab.train.pretrain import pretrain_speech
    from moshivis_lab.vision.pretrain import pretrain_vision

    c = base_configs(cfg.name)
    out: dict[str, Any] = {"bases": install_bases(cfg, log=print if progress else lambda m: None)}
    out["data"] = build_data(cfg, progress=progress)
    report = pretrain_speech(cfg, c["speech"], progress=progress)
    while not report.get("finished", True):  # a time budget ran out: resume until done
        report = pretrain_speech(cfg, c["speech"], progress=progress)
    out["speech_lm"] = report
    out["vision"] = pretrain_vision(cfg, c["vision"], c["vision_model"], progress=progress)
    return out
