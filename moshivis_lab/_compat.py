"""Work-arounds for the environment, applied once when the package is imported."""

from __future__ import annotations

import importlib.machinery
import sys
import types


def ensure_torchaudio_importable() -> None:
    """Let ``import torchaudio`` succeed even when the installed torchaudio build is broken.

    There is no CPU torchaudio matching torch 2.13, but torchcrepe depends on it, so pip installs
    a build whose C++ extension fails to load (``OSError``). transformers imports torchaudio
    whenever it is installed, which would break ``from transformers import MimiModel`` (and
    SiglipVisionModel). Only when the real import fails, a minimal stub module takes its place;
    nothing in moshivis_lab calls torchaudio (torchcrepe only uses it to read files).
    """
    if "torchaudio" in sys.modules:
        return
    try:
        import torchaudio  # noqa: F401
    except (OSError, ImportError):
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        stub.__version__ = "0.0.0+moshivis_lab_stub"  # type: ignore[attr-defined]
        stub.__doc__ = "Stub: the installed torchaudio failed to import (see moshivis_lab._compat)."
        sys.modules["torchaudio"] = stub


def limit_numpy_blas_threads() -> None:
    """Run NumPy's BLAS on one thread (``MOSHIVIS_BLAS_THREADS`` overrides).

    The lab's NumPy matrix products are small (codec quantisation, k-means); multi-threaded
    OpenBLAS spin-waits on them, which measured 40x slower (42 ms vs 0.9 ms for a 150x80 by
    80x256 product) on 2 busy cores. torch's own thread pool is not touched.
    """
    import os

    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=int(os.environ.get("MOSHIVIS_BLAS_THREADS", "1")), user_api="blas")
