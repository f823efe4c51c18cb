"""The Moshi speech-text LM, readable top to bottom: temporal transformer + depth transformer.

A token grid ``codes [B, K, T]`` (K = 1 + n_q) holds, per 80 ms frame, row 0 Moshi's text
("inner monologue"), rows ``1..dep_q`` Moshi's audio codebooks and the remaining rows the user's.
Callers always work with *aligned* grids; the per-row delays (acoustic codebooks one step late)
are applied and undone here. Token ``-1`` (the zero token) embeds to exactly 0 and is never a
loss target.

At model step ``s`` the temporal transformer reads the delayed grid's column ``s - 1`` (an
"initial" column at ``s = 0``: id ``text_card`` for text, ``card`` for audio) and predicts the
text of column ``s``; the depformer then predicts Moshi's audio codebooks of column ``s`` one at a
time, codebook ``k`` seeing ``depformer_in[k](h_s)`` plus the embedding of token ``k - 1`` of
that column (the text token for ``k = 0``).

Parameter names and shapes equal ``moshi.models.lm.LMModel``'s, so its state dict loads strictly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moshivis_lab.config import ZERO_TOKEN, LMConfig
from moshivis_lab.model import hooks as _hooks
from moshivis_lab.model.hooks import HookPoint
from moshivis_lab.model.layers import (
    KVCache,
    RMSNorm,
    TransformerLayer,
    TransformerStack,
    rope_rotations,
    step_linear,
    step_weight,
)
from moshivis_lab.model.sampling import sample_token


@dataclass
class LMOutput:
    """Training-forward outputs, re-aligned to the input grid (no shift needed for the loss).

    ``text_logits [B, 1, T, text_card]`` and ``logits [B, dep_q, T, card]`` predict
    ``codes[:, :1]`` and ``codes[:, 1:1 + dep_q]``. The masks are True where a prediction is
    valid: its target is not the zero token and the delays left it inside the sequence. Invalid
    positions hold NaN, as in moshi.
    """

    text_logits: torch.Tensor
    text_mask: torch.Tensor
    logits: torch.Tensor
    mask: torch.Tensor


def delay_codes(codes: torch.Tensor, delays: Sequence[int], initial: torch.Tensor) -> torch.Tensor:
    """Shift row k of ``codes [B, K, T]`` right by ``delays[k]``, filling with ``initial[k]``."""
    b, k, t = codes.shape
    d = torch.as_tensor(list(delays), device=codes.device)
    src = torch.arange(t, device=codes.device)[None, :] - d[:, None]  # [K, T]
    moved = codes.gather(2, src.clamp(min=0).expand(b, k, t))
    return torch.where(src >= 0, moved, initial.to(codes)[None, :, None])


def undelay(
    x: torch.Tensor, delays: Sequence[int], fill: float | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift row k of ``x [B, K, T, ...]`` left by ``delays[k]``; return it and a validity mask.

    The last ``delays[k]`` steps of row k have no source: they hold ``fill`` and mask False.
    """
    b, k, t = x.shape[:3]
    src = (
        torch.arange(t, device=x.device)[None, :]
        + torch.tensor(list(delays), device=x.device)[:, None]
    )
    valid = src < t  # [K, T]
    mask = valid.expand(b, k, t).clone()
    if not any(delays):
        return x, mask
    trail = [1] * (x.dim() - 3)
    index = src.clamp(max=t - 1).view(1, k, t, *trail).expand(x.shape)
    out = x.gather(2, index).masked_fill(~valid.view(1, k, t, *trail), fill)
    return out, mask


@dataclass
class StreamingState:
    """Everything ``MoshiLM.step`` carries from one 80 ms step to the next (preallocated)."""

    batch_size: int
    temperature: float
    top_k: int
    text_temperature: float
    text_top_k: int
    generator: torch.Generator | None
    kv: list[KVCache]  # one per temporal layer, capacity = context (a ring)
    depformer_kv: list[KVCache]  # one per depformer layer, capacity = dep_q, reused every step
    tokens: torch.Tensor  # ring of delayed-grid columns [B, K, ring], by delayed position
    initial: torch.Tensor  # [K] initial tokens
    emb_table: torch.Tensor  # text + audio embedding tables, concatenated
    emb_offsets: torch.Tensor  # [K] first row of each table
    depformer_table: torch.Tensor  # depformer text + audio embedding tables
    depformer_offsets: list[int]
    depformer_in: torch.Tensor  # depformer_in weights concatenated [n * depformer_dim, dim]
    user_groups: list[tuple[int, torch.Tensor, torch.Tensor]]  # (delay, grid rows, user cols)
    out_groups: list[tuple[int, torch.Tensor]]  # (delay, Moshi rows 0..dep_q)
    rope: torch.Tensor  # RoPE rotations of the first positions [P, head_dim / 2], row j = step j
    offset: int = 0  # number of steps taken
    text_logits: torch.Tensor | None = None  # [B, text_card] of the last step
    audio_logits_steps: list[torch.Tensor] = field(default_factory=list)

    @property
    def audio_logits(self) -> torch.Tensor:
        """Audio logits ``[B, dep_q, card]`` of the last step (codebook k from step k)."""
        return torch.stack(self.audio_logits_steps, dim=1)


class MoshiLM(_hooks.HookedModel, nn.Module):
    """Moshi: temporal transformer over frames + depformer over codebooks, with hooks."""

    hook_aliases = {"transformer.": "temporal."}

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, dd, q = cfg.dim, cfg.depformer_dim, cfg.dep_q
        # Input embeddings: one table per audio row and one for text (+1 row: initial token).
        self.emb = nn.ModuleList([nn.Embedding(cfg.card + 1, d) for _ in range(cfg.n_q)])
        self.text_emb = nn.Embedding(cfg.text_card + 1, d)
        self.hook_embed = HookPoint()
        # Temporal transformer ("Helium").
        self.transformer = TransformerStack(
            [
                TransformerLayer(
                    d, cfg.num_heads, cfg.dim_feedforward, cfg.norm_eps, context=cfg.context
                )
                for _ in range(cfg.num_layers)
            ]
        )
        self.out_norm = RMSNorm(d, cfg.norm_eps)
        self.hook_resid_final = HookPoint()
        self.text_linear = nn.Linear(d, cfg.text_card, bias=False)
        self.hook_text_logits = HookPoint()
        # Depth transformer ("depformer"): one step per Moshi audio codebook.
        n_in = q if cfg.depformer_multi_linear else 1
        self.depformer_in = nn.ModuleList([nn.Linear(d, dd, bias=False) for _ in range(n_in)])
        self.depformer_emb = nn.ModuleList([nn.Embedding(cfg.card + 1, dd) for _ in range(q - 1)])
        self.depformer_text_emb = nn.Embedding(cfg.text_card + 1, dd)
        self.hook_depformer_in = HookPoint()
        n_w = q if cfg.depformer_weights_per_step else 1
        self.depformer = TransformerStack(
            [
                TransformerLayer(
                    dd,
                    cfg.depformer_num_heads,
                    cfg.depformer_dim_feedforward,
                    cfg.norm_eps,
                    n_weights=n_w,
                    norm=cfg.depformer_norm,
                )
                for _ in range(cfg.depformer_num_layers)
            ]
        )
        self.linears = nn.ModuleList([nn.Linear(dd, cfg.card, bias=False) for _ in range(q)])
        self.hook_audio_logits = HookPoint()
        self._stream: StreamingState | None = None
        self._init_weights()

    # ------------------------------------------------------------------ basics

    @property
    def n_user(self) -> int:
        """Audio rows that come from the user (``n_q - dep_q``)."""
        return self.cfg.n_q - self.cfg.dep_q

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return self.text_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters."""
        return self.text_emb.weight.dtype

    def initial_tokens(self, device: torch.device | None = None) -> torch.Tensor:
        """The initial column ``[K]``: ``text_card`` for text, ``card`` for every audio row."""
        ids = [self.cfg.text_card] + [self.cfg.card] * self.cfg.n_q
        return torch.tensor(ids, dtype=torch.long, device=device or self.device)

    def num_parameters(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Truncated normal ``std = 1/sqrt(fan_in)`` (embeddings ``1/sqrt(dim)``); residual
        output projections scaled by ``1/sqrt(2 * layers)``. Pretrained weights replace this."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                fan = m.weight.shape[1]
                std = 1.0 / math.sqrt(fan)
                nn.init.trunc_normal_(m.weight, std=std, a=-3 * std, b=3 * std)
        for stack in (self.transformer, self.depformer):
            scale = 1.0 / math.sqrt(2 * len(stack.layers))
            for layer in stack.layers:
                for name, p in layer.named_parameters():
                    if "out_projs" in name or "linear_out" in name:
                        p.mul_(scale)

    def _check_codes(self, codes: Any) -> torch.Tensor:
        """``codes`` as a long tensor ``[B, K, T]`` with ids in range, or a ValueError."""
        cfg = self.cfg
        if not isinstance(codes, torch.Tensor):
            raise ValueError(f"codes must be a torch.Tensor [B, K, T], got {type(codes).__name__}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.dim() != 3 or codes.shape[1] != cfg.num_codebooks or codes.shape[2] == 0:
            raise ValueError(
                f"codes must have shape [B, K={cfg.num_codebooks}, T>0] "
                f"(1 text row + {cfg.n_q} audio rows), got {tuple(codes.shape)}"
            )
        codes = codes.long()
        _check_range(codes[:, :1], cfg.text_card, "text row (0)")
        _check_range(codes[:, 1:], cfg.card, "audio rows (1..)")
        return codes

    def _check_cross(self, image_kv: Any) -> None:
        if image_kv is not None and all(
            layer.cross_attention is None for layer in self.transformer.layers
        ):
            raise ValueError("image_kv was given but no temporal layer has a cross_attention")

    def _embedding_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Text and audio input tables stacked ``[rows, dim]`` and each row's first index."""
        tables = [self.text_emb.weight] + [e.weight for e in self.emb]
        sizes = torch.tensor([t.shape[0] for t in tables], device=self.device)
        return torch.cat(tables), torch.cumsum(sizes, 0) - sizes

    def _embed(
        self, tokens: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        """Sum of the K embeddings of ``tokens [N, K]`` -> ``[N, dim]``; zero tokens add 0."""
        weight = (tokens != ZERO_TOKEN).to(table.dtype)
        index = tokens.clamp(min=0) + offsets
        return F.embedding_bag(index, table, mode="sum", per_sample_weights=weight)

    def _depformer_tables(self) -> tuple[torch.Tensor, list[int]]:
        """Depformer text + audio tables stacked, and the first row of codebook k's table."""
        tables = [self.depformer_text_emb.weight] + [e.weight for e in self.depformer_emb]
        offsets = [0]
        for t in tables[:-1]:
            offsets.append(offsets[-1] + t.shape[0])
        return torch.cat(tables), offsets

    # ------------------------------------------------------------------ training forward

    def forward(self, codes: torch.Tensor, image_kv: Any = None) -> LMOutput:
        """Teacher-forced logits for an aligned grid ``codes [B, K, T]`` (see ``LMOutput``)."""
        codes = self._check_codes(codes)
        self._check_cross(image_kv)
        cfg = self.cfg
        b, k, t = codes.shape
        initial = self.initial_tokens(codes.device)
        delayed = delay_codes(codes, cfg.delays, initial)
        inputs = torch.cat([initial[None, :, None].expand(b, k, 1), delayed[:, :, :-1]], dim=2)

        table, offsets = self._embedding_tables()
        x = self._embed(inputs.transpose(1, 2).reshape(b * t, k), table, offsets)
        x = self.hook_embed(x.view(b, t, cfg.dim))
        rope = rope_rotations(
            torch.arange(t, device=codes.device), cfg.dim // cfg.num_heads, cfg.max_period
        )
        for layer in self.transformer.layers:
            x = layer(x, rope=rope, cross_kv=image_kv)
        h = self.hook_resid_final(self.out_norm(x))
        text_logits = self.hook_text_logits(self.text_linear(h))  # [B, T, text_card]
        q = cfg.dep_q
        text, text_mask = undelay(text_logits[:, None], cfg.delays[:1], float("nan"))
        if (codes[:, 1 : 1 + q] == ZERO_TOKEN).all():
            # Speechless grids (MoshiVis' text-only samples): no audio target anywhere, so the
            # depformer is skipped; its logits read as NaN and are fully masked.
            audio = h.new_full((), float("nan")).expand(b, q, t, cfg.card)
            audio_mask = torch.zeros(b, q, t, dtype=torch.bool, device=codes.device)
        else:
            audio_logits = self._depformer_forward(h, delayed)  # [B, T, dep_q, card]
            audio, audio_mask = undelay(
                audio_logits.transpose(1, 2), cfg.delays[1 : 1 + q], float("nan")
            )
        text_mask = text_mask & (codes[:, :1] != ZERO_TOKEN)
        audio_mask = audio_mask & (codes[:, 1 : 1 + q] != ZERO_TOKEN)
        return LMOutput(text, text_mask, audio, audio_mask)

    def _depformer_forward(self, h: torch.Tensor, delayed: torch.Tensor) -> torch.Tensor:
        """All codebooks of all steps at once: ``h [B, T, dim]`` -> logits ``[B, T, dep_q, card]``.

        The depformer's batch is every (b, s) pair; its sequence axis is the codebook k, fed the
        delayed grid's token of row k (text for k = 0, audio codebook k - 1 otherwise).
        """
        cfg = self.cfg
        b, t, _ = h.shape
        q, dd = cfg.dep_q, cfg.depformer_dim
        w_in = torch.cat([m.weight for m in self.depformer_in])
        x = F.linear(h, w_in).view(b * t, -1, dd)  # [N, dep_q or 1, dd]
        prev = delayed[:, :q].transpose(1, 2).reshape(b * t, q)
        table, offsets = self._depformer_tables()
        index = prev.clamp(min=0) + torch.tensor(offsets, device=prev.device)
        emb = F.embedding(index, table)
        emb = torch.where((prev != ZERO_TOKEN)[..., None], emb, torch.zeros((), dtype=emb.dtype))
        x = self.hook_depformer_in(x + emb)
        for layer in self.depformer.layers:
            x = layer(x)
        logits = step_linear(x, step_weight(self.linears))  # [N, dep_q, card]
        return self.hook_audio_logits(logits.view(b, t, q, cfg.card))

    def loss(self, codes: torch.Tensor, output: LMOutput) -> dict[str, torch.Tensor]:
        """Weighted text + audio cross-entropy over valid positions, and its parts.

        Each part is ``sum(w * CE) / sum(w)`` over unmasked positions: text targets equal to PAD
        or EPAD get ``text_padding_weight``, the semantic codebook (first audio row)
        ``semantic_weight``, everything else 1. ``loss = text_weight * text_loss +
        audio_weight * audio_loss``. A part with no valid position is 0. Also returned (no
        gradient needed): ``semantic_loss``, ``acoustic_loss`` and ``audio_loss_per_codebook``,
        plain means of the CE.
        """
        cfg = self.cfg
        codes = self._check_codes(codes)
        q = cfg.dep_q
        if output.logits.shape[:3] != (codes.shape[0], q, codes.shape[2]):
            raise ValueError(
                f"output logits {tuple(output.logits.shape)} do not match codes {tuple(codes.shape)}"
            )
        # Text.
        mask = output.text_mask[:, 0]
        target = codes[:, 0][mask]
        ce = F.cross_entropy(output.text_logits[:, 0][mask].float(), target, reduction="none")
        pad = (target == cfg.existing_text_padding_id) | (
            target == cfg.existing_text_end_padding_id
        )
        w = torch.where(pad, cfg.text_padding_weight, 1.0)
        text_loss = (ce * w).sum() / w.sum().clamp_min(1e-12)
        # Audio.
        mask = output.mask
        target = codes[:, 1 : 1 + q][mask]
        ce = F.cross_entropy(output.logits[mask].float(), target, reduction="none")
        book = torch.arange(q, device=codes.device)[None, :, None].expand_as(mask)[mask]
        w = torch.where(book == 0, cfg.semantic_weight, 1.0)
        audio_loss = (ce * w).sum() / w.sum().clamp_min(1e-12)
        with torch.no_grad():
            count = torch.bincount(book, minlength=q).clamp_min(1)
            per_book = torch.bincount(book, weights=ce.detach().float(), minlength=q) / count
            acoustic = book > 0
            acoustic_loss = ce[acoustic].mean() if acoustic.any() else ce.new_zeros(())
        return {
            "loss": cfg.text_weight * text_loss + cfg.audio_weight * audio_loss,
            "text_loss": text_loss,
            "audio_loss": audio_loss,
            "semantic_loss": per_book[0],
            "acoustic_loss": acoustic_loss,
            "audio_loss_per_codebook": per_book,
        }

    # ------------------------------------------------------------------ streaming generation

    @contextlib.contextmanager
    def streaming(
        self,
        batch_size: int,
        *,
        temperature: float = 0.8,
        top_k: int = 250,
        text_temperature: float = 0.7,
        text_top_k: int = 25,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[StreamingState]:
        """Enter streaming mode: preallocate the KV caches and token ring for ``batch_size``.

        Sampling settings hold for the whole session (temperature 0 = greedy; separate settings
        for text and audio); draws come from ``generator``, or a fresh one seeded with ``seed``.
        Everything is freed on exit, also after an exception. Weights are read on entry: do not
        change them inside the block.
        """
        if self._stream is not None:
            raise RuntimeError("this model is already streaming; leave the other `with` first")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        with torch.inference_mode():
            state = self._new_state(
                batch_size, temperature, top_k, text_temperature, text_top_k, generator
            )
        self._stream = state
        try:
            yield state
        finally:
            self._stream = None

    @property
    def is_streaming(self) -> bool:
        """Whether a ``streaming`` block is open."""
        return self._stream is not None

    @property
    def streaming_state(self) -> StreamingState | None:
        """The open streaming session, if any."""
        return self._stream

    def _new_state(
        self,
        batch_size: int,
        temperature: float,
        top_k: int,
        text_temperature: float,
        text_top_k: int,
        generator: torch.Generator | None,
    ) -> StreamingState:
        cfg, dev, dt = self.cfg, self.device, self.dtype

        def cache(heads: int, head_dim: int, capacity: int) -> KVCache:
            shape = (batch_size, heads, capacity, head_dim)
            return KVCache(
                torch.zeros(shape, device=dev, dtype=dt), torch.zeros(shape, device=dev, dtype=dt)
            )

        hd = cfg.dim // cfg.num_heads
        dhd = cfg.depformer_dim // cfg.depformer_num_heads
        ring = 2 * cfg.max_delay + 2
        first_user = 1 + cfg.dep_q
        user_groups, out_groups = [], []
        for d in sorted(set(cfg.delays)):
            rows = [r for r in range(first_user, cfg.num_codebooks) if cfg.delays[r] == d]
            if rows:
                r = torch.tensor(rows, device=dev)
                user_groups.append((d, r, r - first_user))
            rows = [r for r in range(first_user) if cfg.delays[r] == d]
            if rows:
                out_groups.append((d, torch.tensor(rows, device=dev)))
        table, offsets = self._embedding_tables()
        dep_table, dep_offsets = self._depformer_tables()
        return StreamingState(
            batch_size=batch_size,
            temperature=temperature,
            top_k=top_k,
            text_temperature=text_temperature,
            text_top_k=text_top_k,
            generator=generator,
            kv=[cache(cfg.num_heads, hd, cfg.context) for _ in range(cfg.num_layers)],
            depformer_kv=[
                cache(cfg.depformer_num_heads, dhd, cfg.dep_q)
                for _ in range(cfg.depformer_num_layers)
            ],
            tokens=torch.full(
                (batch_size, cfg.num_codebooks, ring), ZERO_TOKEN, dtype=torch.long, device=dev
            ),
            initial=self.initial_tokens(dev),
            emb_table=table.detach().clone(),
            emb_offsets=offsets,
            depformer_table=dep_table.detach().clone(),
            depformer_offsets=dep_offsets,
            depformer_in=torch.cat([m.weight for m in self.depformer_in]).detach().clone(),
            user_groups=user_groups,
            out_groups=out_groups,
            # Same numbers as rope_rotations([j]) at step j (elementwise), computed once.
            rope=rope_rotations(torch.arange(2 * cfg.context, device=dev), hd, cfg.max_period),
        )

    @torch.inference_mode()
    def step(
        self, user_codes: torch.Tensor, image_kv: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One 80 ms step: take the user's newest frame, return Moshi's aligned frame.

        ``user_codes [B, n_user]``: the user's codes for the frame just recorded (``-1`` = no
        input). As in moshi's ``LMGen``, the frame given at call ``j`` (0-based) is the user's
        frame ``j - 1`` of the aligned training grid (the one at call 0 is not used): the model
        at call ``j`` has heard the user up to now and writes its own frame ``j``.

        Returns ``(text_token [B], audio_codes [B, dep_q])``: Moshi's aligned frame
        ``j - max_delay`` (text and all codebooks of that same frame, so delays never leak to the
        caller). For the first ``max_delay`` calls nothing is complete yet and both are ``-1``.
        Logits of this call (text of frame ``j``, audio of delayed column ``j``) are in
        ``model.streaming_state.text_logits`` / ``.audio_logits``.
        """
        st = self._stream
        if st is None:
            raise RuntimeError("step() needs a streaming session: `with model.streaming(B): ...`")
        cfg = self.cfg
        user = self._check_user_codes(user_codes, st.batch_size)
        self._check_cross(image_kv)
        j, ring = st.offset, st.tokens.shape[2]
        # The user's frame j is column j - 1 of the grid: row r goes to delayed position j-1+d_r.
        for d, rows, cols in st.user_groups:
            st.tokens[:, rows, (j - 1 + d) % ring] = user[:, cols]
        column = st.tokens[:, :, (j - 1) % ring]
        if j <= cfg.max_delay:  # rows still inside their delay read the initial token
            delays = torch.tensor(cfg.delays, device=column.device)
            column = torch.where(delays >= j, st.initial, column)

        x = self._embed(column, st.emb_table, st.emb_offsets)[:, None]
        x = self.hook_embed(x)
        if j < st.rope.shape[0]:
            rope = st.rope[j : j + 1]
        else:
            rope = rope_rotations(
                torch.tensor([j], device=x.device), cfg.dim // cfg.num_heads, cfg.max_period
            )
        for layer, kv in zip(self.transformer.layers, st.kv, strict=True):
            x = layer(x, rope=rope, cache=kv, pos=j, cross_kv=image_kv)
        h = self.hook_resid_final(self.out_norm(x))
        text_logits = self.hook_text_logits(self.text_linear(h))[:, 0]
        text = sample_token(text_logits, st.text_temperature, st.text_top_k, st.generator)
        st.text_logits = text_logits
        audio = self._depformer_step(h, text, st)

        st.tokens[:, 0, j % ring] = text
        st.tokens[:, 1 : 1 + cfg.dep_q, j % ring] = audio
        st.offset += 1
        frame = j - cfg.max_delay
        out = torch.full(
            (st.batch_size, 1 + cfg.dep_q), ZERO_TOKEN, dtype=torch.long, device=x.device
        )
        if frame >= 0:
            for d, rows in st.out_groups:
                out[:, rows] = st.tokens[:, rows, (frame + d) % ring]
        return out[:, 0], out[:, 1:]

    def _depformer_step(
        self, h: torch.Tensor, text: torch.Tensor, st: StreamingState
    ) -> torch.Tensor:
        """Sample Moshi's dep_q audio tokens of the current step, one codebook after the other."""
        cfg = self.cfg
        dd = cfg.depformer_dim
        projected = F.linear(h, st.depformer_in)  # [B, 1, n * dd]
        multi = projected.shape[-1] > dd
        tokens, prev = [], text
        st.audio_logits_steps = []
        for k in range(cfg.dep_q):
            x = projected[..., k * dd : (k + 1) * dd] if multi else projected
            x = x + F.embedding(prev + st.depformer_offsets[k], st.depformer_table)[:, None]
            x = self.hook_depformer_in(x)
            for layer, kv in zip(self.depformer.layers, st.depformer_kv, strict=True):
                x = layer(x, cache=kv, pos=k)
            logits = self.hook_audio_logits(F.linear(x, self.linears[k].weight)[:, :, None])
            logits = logits[:, 0, 0]
            st.audio_logits_steps.append(logits)
            prev = sample_token(logits, st.temperature, st.top_k, st.generator)
            tokens.append(prev)
        return torch.stack(tokens, dim=1)

    def _check_user_codes(self, user_codes: Any, batch_size: int) -> torch.Tensor:
        """``user_codes`` as a long tensor ``[B, n_user]`` in ``[-1, card)``, or a ValueError."""
        if not isinstance(user_codes, torch.Tensor):
            user_codes = torch.as_tensor(user_codes)
        if (
            user_codes.is_floating_point()
            or user_codes.is_complex()
            or user_codes.dtype == torch.bool
        ):
            raise ValueError(f"user_codes must be an integer tensor, got dtype {user_codes.dtype}")
        if tuple(user_codes.shape) != (batch_size, self.n_user):
            raise ValueError(
                f"user_codes must have shape [B={batch_size}, {self.n_user}], "
                f"got {tuple(user_codes.shape)}"
            )
        user_codes = user_codes.long().to(self.device)
        _check_range(user_codes, self.cfg.card, "user_codes")
        return user_codes

    # ------------------------------------------------------------------ hooks


def _check_range(x: torch.Tensor, card: int, what: str) -> None:
    """Raise a ValueError unless every id lies in ``[-1, card)`` (-1 is the zero token)."""
    lo, hi = (int(v) for v in torch.aminmax(x))  # one pass over x
    if lo < ZERO_TOKEN or hi >= card:
        raise ValueError(
            f"{what}: token ids must lie in [-1, {card}) (-1 = zero token), got [{lo}, {hi}]"
        )
