"""Stop a training run at the first non-finite loss (or gradient norm), saying where and why.

The three trainers (speech LM, vision encoder, adapters) call ``check_finite`` before the
optimizer step, so the parameters are never updated with a NaN / inf. The error names the
update, the ids of the batch's samples and the last good checkpoint to resume from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class NonFiniteLossError(FloatingPointError):
    """A loss (or gradient norm) was NaN or infinite; ``step``, ``batch_ids`` and
    ``checkpoint`` (the last good checkpoint's weights file, or None) say where."""

    def __init__(
        self,
        message: str,
        *,
        step: int,
        values: dict[str, float],
        batch_ids: list[str],
        checkpoint: Path | None,
    ) -> None:
        super().__init__(message)
        self.step = step
        self.values = values
        self.batch_ids = batch_ids
        self.checkpoint = checkpoint


def last_checkpoint(out: str | Path) -> tuple[Path | None, int]:
    """The weights file ``state.json`` in ``out`` points at and its step (``None, 0`` if none)."""
    from moshivis_lab.artefacts import read_json

    state = Path(out) / "state.json"
    if not state.exists():
        return None, 0
    try:
        st = read_json(state)
        return Path(out) / "ckpt" / st["model"], int(st["step"])
    except (ValueError, KeyError, TypeError):
        return None, 0


def check_finite(
    what: str,
    step: int,
    values: Mapping[str, Any],
    batch_ids: Sequence[Any],
    out: str | Path,
) -> None:
    """Raise ``NonFiniteLossError`` if any of ``values`` (floats or 0-d tensors) is NaN / inf.

    ``what`` names the trainer, ``step`` the update being made (1-based, as in
    ``metrics.jsonl``), ``batch_ids`` the samples of its batch, ``out`` the run directory.
    """
    floats = {k: float(v) for k, v in values.items()}
    bad = {k: v for k, v in floats.items() if not math.isfinite(v)}
    if not bad:
        return
    ckpt, ck_step = last_checkpoint(out)
    ids = [str(i) for i in batch_ids]
    shown = ", ".join(ids[:32]) + (f", ... ({len(ids)} in all)" if len(ids) > 32 else "")
    where = (
        f"The last good checkpoint is {ckpt} (step {ck_step}; `state.json` in {out} points at "
        "it, so running again resumes from there)"
        if ckpt is not None
        else f"There is no checkpoint yet in {out} (a new run starts from scratch)"
    )
    parts = ", ".join(f"{k}={v}" for k, v in bad.items())
    raise NonFiniteLossError(
        f"{what}: non-finite {parts} at step {step}; the optimizer step was not taken. "
        f"Batch sample ids: [{shown}]. {where}. Lower the learning rate or look at these "
        "samples before resuming.",
        step=step,
        values=floats,
        batch_ids=ids,
        checkpoint=ckpt,
    )
