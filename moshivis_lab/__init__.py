"""moshivis_lab: an interpretable research workbench for vision-speech models (MoshiVis)."""

from moshivis_lab._compat import ensure_torchaudio_importable, limit_numpy_blas_threads
from moshivis_lab.config import CodecConfig, LabConfig, TokenizerConfig, WorldConfig, preset

ensure_torchaudio_importable()
limit_numpy_blas_threads()

__all__ = ["CodecConfig", "LabConfig", "TokenizerConfig", "WorldConfig", "preset"]
__version__ = "0.1.0"
