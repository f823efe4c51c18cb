"""From a preset to everything a notebook works on, in one call: ``load_lab(cfg, run)``.

For the tiny presets it builds what is missing (``ensure_pretrained``), trains, resumes or reuses
the adapter run to its end, and loads the trained MoshiVis, the frozen encoder and the
tokenizer. For ``moshika-vis`` (``cfg.checkpoint``) it loads Kyutai's released directory instead
(``model.release.load_release``). ``Lab.engine`` is the conversation engine behind the widgets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from moshivis_lab.config import LabConfig


def adapter_config(cfg: LabConfig) -> Any:
    """The preset's adapter-training config (the smoke one on one thread for ``smoke``)."""
    from moshivis_lab.train.adapters import TrainConfig

    return TrainConfig.smoke().replace(threads=1) if cfg.name == "smoke" else TrainConfig.tiny()


def trained_run(cfg: LabConfig, run: str = "main", *, progress: bool = False) -> dict[str, Any]:
    """Build what is missing, then train (or resume, or reuse) run ``run`` to its end; its report."""
    from moshivis_lab.train.adapters import ensure_pretrained, train_adapters

    if cfg.released:
        raise ValueError(
            "the moshika-vis preset runs the released model: there is nothing to train"
        )
    ensure_pretrained(cfg, progress=progress)
    tcfg = adapter_config(cfg)
    report = train_adapters(cfg, tcfg, run=run, progress=progress)
    while not report.get("finished", True):  # an invocation's time budget ran out: resume
        report = train_adapters(cfg, tcfg, run=run, progress=progress)
    return report


@dataclass
class Lab:
    """The loaded parts of one preset and run (``released``: Kyutai's model, no run)."""

    cfg: LabConfig
    run: str | None
    model: Any  # MoshiVis, eval mode
    encoder: Any  # ImageEncoder, frozen
    tokenizer: Any  # TextTokenizer
    report: dict[str, Any] = field(default_factory=dict)  # the run's train report
    release: Any = None  # model.release.Release for moshika-vis
    _engine: Any = None

    @property
    def released(self) -> bool:
        """Whether this is Kyutai's released model."""
        return self.release is not None

    @property
    def small(self) -> bool:
        """Whether the preset is the seconds-sized ``smoke`` one (notebooks shrink their loops)."""
        return self.cfg.name == "smoke"

    @property
    def engine(self) -> Any:
        """The ``ConversationEngine`` over these parts (made once)."""
        if self._engine is None:
            from moshivis_lab.interp.conversation import ConversationEngine

            if self.released:
                self._engine = ConversationEngine.from_release(self.release, cfg=self.cfg)
            else:
                from moshivis_lab.audio.codecs import load_codec

                self._engine = ConversationEngine(
                    self.model, load_codec(self.cfg), self.tokenizer, self.encoder,
                    cfg=self.cfg, run=self.run,
                )  # fmt: skip
        return self._engine

    def describe(self) -> str:
        """One line: the preset, where cross-attention sits, the image tokens."""
        what = "Kyutai's released model" if self.released else f"run {self.run!r}"
        return (
            f"preset {self.cfg.name} ({what}): cross-attention in temporal layers "
            f"{self.model.cfg.layers}, {self.model.cfg.xa_heads} heads, "
            f"{self.encoder.num_tokens} image tokens per image"
        )


def load_lab(
    cfg: LabConfig,
    run: str = "main",
    *,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> Lab:
    """Everything of preset ``cfg`` (see the module docstring); seeds torch with 0."""
    if cfg.released:
        from moshivis_lab.model.release import load_release

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        r = load_release(cfg.checkpoint, device=dev, dtype=dtype)
        torch.manual_seed(0)
        return Lab(cfg, None, r.model, r.encoder, r.tokenizer, release=r)
    from moshivis_lab.train.adapters import load_trained
    from moshivis_lab.vision.pretrain import load_vision_encoder
    from moshivis_lab.world.tokenizer import TextTokenizer

    report = trained_run(cfg, run, progress=progress)
    torch.manual_seed(0)
    return Lab(
        cfg,
        run,
        load_trained(cfg, run),
        load_vision_encoder(cfg),
        TextTokenizer.load(cfg.tokenizer_path),
        report=report,
    )
