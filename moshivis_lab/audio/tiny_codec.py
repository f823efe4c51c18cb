"""The tiny default codec: a parametric source-filter "vocoder codec" fitted offline in seconds.

Every 80 ms frame (12.5 Hz at 24 kHz) is described at ``subframes`` points (every 20 ms, at the
end of each sub-frame): log-F0 and voicing (a vectorised YIN over numpy FFTs), log-energy, and a
smooth spectral envelope as mel-cepstra c1.. (librosa mel filterbank + scipy DCT, level-free).
The codebooks, like Mimi's, put a content-like "semantic" code first and acoustic detail after:

====  =====================================================================================
 0    the "semantic" code: a small phone classifier (fitted on TTS speech with known phonemes)
      reads each point's envelope with the ``phone_context`` points before it; the frame's code
      is the k-means cluster of its points' phone posteriors (``semantic="phonetic"``, the
      default: content first and speaker-independent, like Mimi's WavLM-distilled codebook).
      ``semantic="kmeans"``: k-means of the frame's mean cepstral shape (speaker-dependent)
 1    frame mean log-F0, uniform on the log scale over [fmin, fmax]; code 0 means unvoiced
 2    k-means of the F0 contour inside the frame (deviation from code 1) + voicing pattern
 3    k-means of the energy contour (dB) inside the frame
 4..  residual k-means (RVQ) of the sub-frame cepstral envelopes after codebook 0
====  =====================================================================================

Code 0 of every codebook is reserved for digital silence (flat shape, unvoiced, floor energy,
zero residual), so silence always encodes to the all-zero column and decodes to exact zeros.

YIN's octave/outlier errors are fixed against the median F0 of the two points either side, so
encoding looks ahead ~61 ms past the end of a frame. Decoding is causal per frame (streamed
decoding equals batch decoding): a phase-continuous pulse train (closed-form Dirichlet kernel,
harmonics up to 5.5 kHz, noise above) and noise are mixed by voicing, then filtered block by
block (5 ms) with minimum-phase filters made from the envelope (cepstral method), overlap-added.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import librosa
import numpy as np
import scipy.fft
from safetensors.numpy import load_file, save_file

from moshivis_lab.artefacts import atomic_path, sha256_file
from moshivis_lab.audio.io import to_mono_float
from moshivis_lab.audio.protocol import n_frames, prepare_input, validate_codes, validate_frame
from moshivis_lab.config import CodecConfig

if TYPE_CHECKING:
    from moshivis_lab.world.speech import Utterance, Voice

FORMAT_VERSION = 2  # 2: the phonetic semantic codebook
TIE_TOL = 1e-9  # nearest-codeword ties (see _nearest)
CONFIG_FILE = "tiny_codec.json"
TABLES_FILE = "tiny_codec.safetensors"

# Analysis (fixed DSP settings; stored with the fitted codec for provenance).
N_FFT = 1024  # analysis FFT; the window (2 sub-frames, hann) is centred on each point
FLOOR_DB = -80.0  # energies are clamped here; a point below it is silent
YIN_THRESHOLD = 0.15  # YIN absolute threshold on the normalised difference
YIN_WINDOW = 480  # YIN integration window (samples)
VOICING_APER = 0.6  # YIN aperiodicity below which a (loud enough) point is voiced
VOICED_MIN_DB = -60.0  # quieter points are never voiced
F0_CONTEXT = 2  # points either side whose median F0 checks a point for octave/outlier errors
F0_OUTLIER = math.log(1.2)  # farther than this from that median is an error
MEL_FLOOR = 1e-6  # log-mel floor, relative to the frame's mean mel power (-60 dB)
VOICING_WEIGHT = 1.0  # weight of the voicing bits against log-F0 deviations in codebook 2
# Synthesis.
NOISE_TABLE = 1 << 16
NOISE_SEED = 20250101
VOICED_CUTOFF_HZ = 5500.0  # voiced excitation: harmonics below, noise above (mixed excitation)
BREATH = 0.1  # share of noise in the voiced excitation below the cutoff


@dataclass
class Features:
    """Per-point analysis of a signal: arrays ``[T, subframes]`` (``shape`` has a last dim)."""

    logf0: np.ndarray  # natural log of Hz; meaningless where not voiced
    voicing: np.ndarray  # 1.0 voiced / 0.0 unvoiced (float: the pulse share of the excitation)
    energy: np.ndarray  # dB re full scale power, >= FLOOR_DB
    shape: np.ndarray  # [T, S, n_cepstra - 1] mel-cepstra c1.. (level-free envelope)

    @property
    def silent(self) -> np.ndarray:
        """Points at the energy floor."""
        return self.energy <= FLOOR_DB

    @property
    def voiced(self) -> np.ndarray:
        """Points with some voicing (and not silent)."""
        return (self.voicing > 0) & ~self.silent


class _Analyzer:
    """Point-wise analysis (energy, YIN F0 + aperiodicity, mel-cepstral envelope) of padded audio."""

    def __init__(self, cfg: CodecConfig) -> None:
        self.cfg = cfg
        self.S = cfg.frame_size // cfg.subframes
        sr = cfg.sample_rate
        win = np.zeros(N_FFT)
        n_win = min(2 * self.S, N_FFT)
        win[(N_FFT - n_win) // 2 : (N_FFT - n_win) // 2 + n_win] = np.hanning(n_win + 2)[1:-1]
        self.window = win
        self.win_power = float(np.sum(win**2))
        self.mel = librosa.filters.mel(
            sr=sr, n_fft=N_FFT, n_mels=cfg.n_mels, fmin=0.0, fmax=sr / 2
        ).astype(np.float64)
        self.tau_min = max(2, int(math.floor(sr / cfg.fmax)))
        self.tau_max = int(math.ceil(sr / cfg.fmin))
        self.yin_w = max(YIN_WINDOW, self.tau_max)  # integration window >= longest period
        self.yin_n = self.yin_w + self.tau_max + 2
        self.yin_fft = scipy.fft.next_fast_len(self.yin_n, real=True)
        self.half = max(N_FFT // 2, self.yin_n - self.yin_n // 2)
        # F0 is checked against its neighbours, so F0_CONTEXT points either side are analysed too.
        self.pad_left = self.half + F0_CONTEXT * self.S  # context before a chunk's first frame

    @property
    def lookahead(self) -> int:
        """Samples needed after a frame's end to analyse it."""
        return self.half + F0_CONTEXT * self.S

    def features(self, xp: np.ndarray, n: int) -> Features:
        """Analyse ``n`` frames of ``xp`` (``pad_left`` context, then the frames, then lookahead)."""
        S, sub, ctx = self.S, self.cfg.subframes, F0_CONTEXT
        n_pts = n * sub
        k = np.arange(-ctx, n_pts + ctx)
        centres = self.pad_left + S * (k + 1)
        view = np.lib.stride_tricks.sliding_window_view(xp, N_FFT)
        frames = view[centres - N_FFT // 2] * self.window  # [P + 2 ctx, N_FFT]
        power = np.einsum("ij,ij->i", frames, frames) / self.win_power
        energy = np.maximum(10.0 * np.log10(np.maximum(power, 1e-30)), FLOOR_DB)
        silent = energy <= FLOOR_DB
        energy[silent] = FLOOR_DB
        logf0 = np.zeros(len(k))
        voicing = np.zeros(len(k))
        loud = np.flatnonzero(energy > VOICED_MIN_DB)
        if loud.size:
            f0, aper = self._yin(xp, centres[loud])
            logf0[loud] = np.log(f0)
            voicing[loud] = (aper < VOICING_APER).astype(np.float64)
            logf0 = _clean_logf0(logf0, voicing > 0, ctx)
        mid = slice(ctx, ctx + n_pts)
        energy, logf0, voicing = energy[mid], logf0[mid], voicing[mid]
        shape = np.zeros((n_pts, self.cfg.n_cepstra - 1))
        live = np.flatnonzero(~silent[mid])
        if live.size:
            spec = np.abs(np.fft.rfft(frames[mid][live], axis=-1)) ** 2
            mel = spec @ self.mel.T
            mel += MEL_FLOOR * mel.mean(axis=-1, keepdims=True) + 1e-30
            cep = scipy.fft.dct(np.log(mel), type=2, norm="ortho", axis=-1)
            shape[live] = cep[:, 1 : self.cfg.n_cepstra]
        return Features(
            logf0=logf0.reshape(n, sub),
            voicing=voicing.reshape(n, sub),
            energy=energy.reshape(n, sub),
            shape=shape.reshape(n, sub, -1),
        )

    def _yin(self, xp: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised YIN at the given centres: F0 (Hz) and aperiodicity (CMND at the chosen lag)."""
        W, tmax, tmin = self.yin_w, self.tau_max, self.tau_min
        view = np.lib.stride_tricks.sliding_window_view(xp, self.yin_n)
        fr = view[centres - self.yin_n // 2]
        fr = fr - fr.mean(axis=-1, keepdims=True)
        nf = self.yin_fft
        r = np.fft.irfft(np.conj(np.fft.rfft(fr[:, :W], nf)) * np.fft.rfft(fr, nf), nf)
        r = r[:, : tmax + 2]
        cs = np.concatenate([np.zeros((len(fr), 1)), np.cumsum(fr**2, axis=-1)], axis=-1)
        taus = np.arange(tmax + 2)
        e_tau = cs[:, taus + W] - cs[:, taus]
        d = np.maximum(e_tau[:, :1] + e_tau - 2.0 * r, 0.0)
        d[:, 0] = 0.0
        cum = np.cumsum(d[:, 1:], axis=-1)
        cmnd = np.ones_like(d)
        cmnd[:, 1:] = d[:, 1:] * taus[1:] / np.maximum(cum, 1e-30)
        mid = cmnd[:, tmin : tmax + 1]
        left = cmnd[:, tmin - 1 : tmax]
        right = cmnd[:, tmin + 1 : tmax + 2]
        is_min = (mid < left) & (mid <= right)
        cand = is_min & (mid < YIN_THRESHOLD)
        first = np.argmax(cand, axis=-1)
        best = np.where(cand.any(axis=-1), first, np.argmin(mid, axis=-1))
        rows = np.arange(len(fr))
        c0, c1, c2 = left[rows, best], mid[rows, best], right[rows, best]
        den = c0 - 2.0 * c1 + c2
        shift = np.where(np.abs(den) > 1e-12, 0.5 * (c0 - c2) / np.where(den == 0, 1, den), 0.0)
        period = tmin + best + np.clip(shift, -1.0, 1.0)
        f0 = np.clip(self.cfg.sample_rate / period, self.cfg.fmin, self.cfg.fmax)
        return f0, c1


def _f0_levels(cfg: CodecConfig) -> np.ndarray:
    """The ``cardinality - 1`` log-F0 levels of codebook 1 (code ``i + 1`` is level ``i``)."""
    lo, hi = math.log(cfg.fmin), math.log(cfg.fmax)
    return lo + (hi - lo) * np.arange(cfg.cardinality - 1) / max(cfg.cardinality - 2, 1)


def _mean_shape(f: Features) -> np.ndarray:
    """Each frame's mean envelope shape over its non-silent points (zeros when all silent)."""
    live = ~f.silent
    n_live = live.sum(-1, keepdims=True)
    return (f.shape * live[..., None]).sum(1) / np.maximum(n_live, 1)


def _pitch_targets(f: Features, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codebook-1 codes (0 = unvoiced) and codebook-2 vectors (F0 deviations, voicing bits)."""
    voiced = f.voiced
    w = voiced.astype(np.float64)
    mean_f0 = (f.logf0 * w).sum(-1) / np.maximum(w.sum(-1), 1.0)
    step = (levels[-1] - levels[0]) / max(len(levels) - 1, 1)
    lvl = np.clip(np.round((mean_f0 - levels[0]) / step), 0, len(levels) - 1).astype(np.int64)
    code = np.where(voiced.any(-1), lvl + 1, 0)
    dev = np.where(voiced, f.logf0 - levels[lvl][:, None], 0.0)
    return code, np.concatenate([dev, w * VOICING_WEIGHT], axis=-1)


def _clean_logf0(logf0: np.ndarray, voiced: np.ndarray, ctx: int) -> np.ndarray:
    """Fix YIN's octave and outlier errors against the median of the voiced points within ``ctx``.

    A voiced point more than ``F0_OUTLIER`` (log) from that median is moved by an octave when
    that lands close, else replaced by the median; unvoiced points are left alone.
    """
    lf = np.where(voiced, logf0, np.nan)
    win = np.lib.stride_tricks.sliding_window_view(
        np.pad(lf, ctx, constant_values=np.nan), 2 * ctx + 1
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = np.nanmedian(win, axis=-1)
    ok = voiced & np.isfinite(ref)
    octaves = lf[:, None] + np.log(2.0) * np.array([0.0, 1.0, -1.0])[None]
    err = np.abs(octaves - ref[:, None])
    best = octaves[np.arange(len(lf)), np.nanargmin(np.where(ok[:, None], err, 0.0), axis=-1)]
    fixed = np.where(np.abs(best - ref) <= F0_OUTLIER, best, ref)
    out = logf0.copy()
    bad = ok & (np.abs(lf - ref) > F0_OUTLIER)
    out[bad] = fixed[bad]
    return out


def _nearest(x: np.ndarray, centroids: np.ndarray, penalty: np.ndarray | None = None) -> np.ndarray:
    """Index of the nearest centroid (squared Euclidean, plus ``penalty [N, K]``) for each row
    of ``x``, with a deterministic tie rule: centroids within ``TIE_TOL`` (relative to the
    distances' scale) of the nearest count as tied and the lowest index wins. BLAS kernels
    (another CPU, another batch size) round the distances differently in the last bits, and a
    plain argmin flips between such near-equal codewords (degenerate codebooks have many)."""
    cc = (centroids**2).sum(-1)
    d = cc[None, :] - 2.0 * (x @ centroids.T)
    if penalty is not None:
        d = d + penalty
    tol = TIE_TOL * (1.0 + (x**2).sum(-1) + cc.max(initial=0.0))
    return np.argmax(d <= d.min(-1, keepdims=True) + tol[:, None], axis=-1)


def _kmeans(x: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """``k`` centroids of ``x`` by sklearn k-means (k-means++ init); fewer points -> repeats."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return np.zeros((k, x.shape[1]))
    uniq = np.unique(x, axis=0)
    if len(uniq) <= k:
        reps = np.resize(np.arange(len(uniq)), k)
        return uniq[reps]
    # One thread: the same centroids on any machine, and no OpenMP stalls on a busy one.
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore")
        km = KMeans(n_clusters=k, n_init=1, max_iter=iters, random_state=seed, tol=1e-6)
        km.fit(x)
    return km.cluster_centers_.astype(np.float64)


def _phone_inputs(points: np.ndarray, history: np.ndarray | None, ctx: int) -> np.ndarray:
    """``[P, (ctx + 1) * D]``: each point's envelope after the ``ctx`` envelopes before it."""
    P, D = points.shape
    prev = np.zeros((ctx, D)) if history is None else np.asarray(history, dtype=np.float64)
    if prev.shape != (ctx, D):
        raise ValueError(f"phone history must be [{ctx}, {D}], got {list(prev.shape)}")
    x = np.concatenate([prev, points])
    return np.concatenate([x[i : i + P] for i in range(ctx + 1)], axis=1)


def _phone_mlp(tables: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Phone posteriors ``[P, phone_classes]`` of classifier inputs (numpy, float64)."""
    norm = tables["phone_norm"]
    h = (x - norm[0]) / norm[1]
    h = np.maximum(h @ tables["phone_w1"] + tables["phone_b1"], 0.0)
    h = np.maximum(h @ tables["phone_w2"] + tables["phone_b2"], 0.0)
    z = h @ tables["phone_w3"] + tables["phone_b3"]
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


PHONE_SILENCE = "_"  # the label of silent points and pauses


def point_phones(utt: Utterance, n_points: int, point_samples: int) -> list[str]:
    """The phoneme under each analysis point of a TTS utterance (points end every 20 ms)."""
    if not getattr(utt, "phonemes", None):
        raise ValueError(
            f"utterance {utt.text[:40]!r} carries no phonemes: synthesize it with "
            "world.speech.synthesize (which records them) to fit a phonetic codec"
        )
    starts = np.array([round(t * utt.sample_rate) for t, _ in utt.phonemes])
    names = [n if n and not n.startswith("_") else PHONE_SILENCE for _, n in utt.phonemes]
    at = (np.arange(n_points) + 1) * point_samples
    idx = np.searchsorted(starts, at, side="right") - 1
    return [names[i] if i >= 0 else PHONE_SILENCE for i in idx]


def _fit_phone_classifier(
    probe: TinyCodec, labelled: list[Utterance], cfg: CodecConfig, progress: bool
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Fit the point-wise phone classifier (a 2-hidden-layer ReLU MLP, trained with torch)."""
    import torch
    from tqdm.auto import tqdm

    if not labelled:
        raise ValueError("a phonetic codec needs labelled speech (utterances with phonemes)")
    xs, labels = [], []
    point = cfg.frame_size // cfg.subframes
    for u in tqdm(labelled, desc="tiny codec: phone labels", disable=not progress):
        wav = prepare_input(u.wav, int(u.sample_rate), cfg.sample_rate)
        f = probe.features(wav)
        T, S, D = f.shape.shape
        lab = np.array(point_phones(u, T * S, point), dtype=object)
        lab[f.silent.reshape(-1)] = PHONE_SILENCE
        xs.append(_phone_inputs(f.shape.reshape(T * S, D), None, cfg.phone_context))
        labels += list(lab)
    inventory = [PHONE_SILENCE] + sorted(set(labels) - {PHONE_SILENCE})
    if len(inventory) > cfg.phone_classes:
        raise ValueError(
            f"the labelled speech has {len(inventory)} phones but phone_classes="
            f"{cfg.phone_classes}; raise CodecConfig.phone_classes"
        )
    index = {p: i for i, p in enumerate(inventory)}
    x = np.concatenate(xs)
    y = np.array([index[p] for p in labels])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    gen = torch.Generator().manual_seed(cfg.seed)
    H, P = cfg.phone_hidden, cfg.phone_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], H),
            torch.nn.ReLU(),
            torch.nn.Linear(H, H),
            torch.nn.ReLU(),
            torch.nn.Linear(H, P),
        ).double()
    xt = torch.from_numpy((x - mu) / sd)
    yt = torch.from_numpy(y)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-2)
    bar = tqdm(range(cfg.phone_epochs), desc="tiny codec: phone classifier", disable=not progress)
    for _ in bar:
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 512):
            b = perm[i : i + 512]
            loss = torch.nn.functional.cross_entropy(net(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    w = [m for m in net if isinstance(m, torch.nn.Linear)]
    b3 = w[2].bias.detach().numpy().copy()
    b3[len(inventory) :] = -1e4  # unused slots are never predicted
    return {
        "phone_norm": np.stack([mu, sd]),
        "phone_w1": w[0].weight.detach().numpy().T.copy(),
        "phone_b1": w[0].bias.detach().numpy().copy(),
        "phone_w2": w[1].weight.detach().numpy().T.copy(),
        "phone_b2": w[1].bias.detach().numpy().copy(),
        "phone_w3": w[2].weight.detach().numpy().T.copy(),
        "phone_b3": b3,
    }, inventory


class TinyCodec:
    """The fitted tiny vocoder codec (see the module docstring for the codebooks)."""

    def __init__(
        self,
        cfg: CodecConfig,
        tables: dict[str, np.ndarray],
        phone_inventory: Sequence[str] = (),
    ) -> None:
        if cfg.kind != "tiny":
            raise ValueError(f"TinyCodec needs CodecConfig(kind='tiny'), got kind={cfg.kind!r}")
        self.cfg = cfg
        self.sample_rate = cfg.sample_rate
        self.frame_rate = cfg.frame_rate
        self.frame_size = cfg.frame_size
        self.num_codebooks = cfg.num_codebooks
        self.cardinality = cfg.cardinality
        self.subframes = cfg.subframes
        self.tables = {k: np.asarray(v, dtype=np.float64) for k, v in tables.items()}
        self.phone_inventory = list(phone_inventory)  # phone name of each classifier output
        self._check_tables()
        self._an = _Analyzer(cfg)
        self._syn = _Synth(cfg, self._an)
        self._f0_levels = _f0_levels(cfg)
        self._contour_pattern = self.tables["contour"][:, cfg.subframes :] > 0.5 * VOICING_WEIGHT

    # ----- shapes of the tables -----
    @staticmethod
    def table_shapes(cfg: CodecConfig) -> dict[str, tuple[int, ...]]:
        """The array shapes a fitted codec with ``cfg`` holds."""
        C, S, D = cfg.cardinality, cfg.subframes, cfg.n_cepstra - 1
        shapes = {
            "semantic": (C, D),
            "contour": (C, 2 * S),
            "energy": (C, S),
            "residual": (cfg.num_codebooks - 4, C, S * D),
        }
        if cfg.semantic == "phonetic":
            n_in, H, P = (cfg.phone_context + 1) * D, cfg.phone_hidden, cfg.phone_classes
            shapes |= {
                "phone_norm": (2, n_in),
                "phone_w1": (n_in, H),
                "phone_b1": (H,),
                "phone_w2": (H, H),
                "phone_b2": (H,),
                "phone_w3": (H, P),
                "phone_b3": (P,),
                "phone_post": (C, S * P),
            }
        return shapes

    def _check_tables(self) -> None:
        want = self.table_shapes(self.cfg)
        got = {k: tuple(v.shape) for k, v in self.tables.items()}
        if got != want:
            raise ValueError(f"tiny codec tables {got} do not match the config, which needs {want}")

    # ----- quantisation -----
    def phone_posteriors(self, f: Features, history: np.ndarray | None = None) -> np.ndarray:
        """Phone posteriors ``[T, subframes, phone_classes]`` of each point (phonetic codec only).

        ``history``: the envelopes ``[phone_context, D]`` of the points before ``f`` (zeros, i.e.
        silence, at the start of a signal); the streaming encoder passes its last points.
        """
        if self.cfg.semantic != "phonetic":
            raise ValueError("phone_posteriors needs a codec fitted with semantic='phonetic'")
        T, S, D = f.shape.shape
        x = _phone_inputs(f.shape.reshape(T * S, D), history, self.cfg.phone_context)
        return _phone_mlp(self.tables, x).reshape(T, S, -1)

    def _semantic_codes(self, f: Features, history: np.ndarray | None) -> np.ndarray:
        t = self.tables
        if self.cfg.semantic == "kmeans":
            return _nearest(_mean_shape(f), t["semantic"])
        T = f.energy.shape[0]
        post = self.phone_posteriors(f, history).reshape(T, -1)
        code = 1 + _nearest(post, t["phone_post"][1:])
        return np.where((~f.silent).any(-1), code, 0)  # code 0: a wholly silent frame

    def quantise(self, f: Features, history: np.ndarray | None = None) -> np.ndarray:
        """Codes ``[K, T]`` of analysed features (``history``: see ``phone_posteriors``)."""
        t = self.tables
        T, S = f.energy.shape
        live = ~f.silent
        voiced = f.voiced
        codes = np.zeros((self.num_codebooks, T), dtype=np.int64)
        codes[0] = self._semantic_codes(f, history)
        codes[1], feat = _pitch_targets(f, self._f0_levels)
        mismatch = (voiced[:, None, :] != self._contour_pattern[None]).sum(-1)
        # the voicing pattern is kept exactly (a mismatch costs more than any distance)
        codes[2] = _nearest(feat, t["contour"], penalty=1e3 * mismatch)
        codes[3] = _nearest(f.energy, t["energy"])
        resid = np.where(live[..., None], f.shape - t["semantic"][codes[0]][:, None, :], 0.0)
        resid = resid.reshape(T, -1)
        for k in range(self.num_codebooks - 4):
            c = _nearest(resid, t["residual"][k])
            codes[4 + k] = c
            resid = resid - t["residual"][k][c]
        return codes

    def dequantise(self, codes: np.ndarray) -> Features:
        """Features (per point) that codes stand for."""
        t = self.tables
        T, S = codes.shape[1], self.subframes
        shape = t["semantic"][codes[0]][:, None, :].repeat(S, axis=1)
        for k in range(self.num_codebooks - 4):
            shape = shape + t["residual"][k][codes[4 + k]].reshape(T, S, -1)
        voiced_frame = codes[1] > 0
        mean = self._f0_levels[np.maximum(codes[1] - 1, 0)]
        cont = t["contour"][codes[2]]
        voiced = self._contour_pattern[codes[2]] & voiced_frame[:, None]
        voicing = voiced.astype(np.float64)
        logf0 = mean[:, None] + cont[:, :S]
        energy = np.maximum(t["energy"][codes[3]], FLOOR_DB)
        return Features(logf0=logf0, voicing=voicing, energy=energy, shape=shape)

    # ----- the protocol -----
    def features(self, wav: np.ndarray, sample_rate: int | None = None) -> Features:
        """Unquantised analysis of a waveform (what the codes approximate)."""
        x = prepare_input(wav, sample_rate, self.sample_rate)
        T = n_frames(x.size, self.frame_size)
        an = self._an
        xp = np.zeros(an.pad_left + T * self.frame_size + an.lookahead + 1)
        xp[an.pad_left : an.pad_left + x.size] = x
        return an.features(xp, T)

    def encode(self, wav: np.ndarray, sample_rate: int | None = None) -> np.ndarray:
        """Codes ``int64 [K, ceil(len / frame_size)]`` of a waveform (see ``audio.io.prepare``)."""
        return self.quantise(self.features(wav, sample_rate))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Float32 waveform of ``T * frame_size`` samples from codes ``[K, T]``."""
        codes = validate_codes(codes, self.num_codebooks, self.cardinality)
        if codes.shape[1] == 0:
            return np.zeros(0, dtype=np.float32)
        state = self._syn.initial_state()
        wav, _ = self._syn.render(self.dequantise(codes), state)
        return wav

    def streaming_encoder(self, sample_rate: int | None = None) -> TinyStreamingEncoder:
        """A fresh streaming encoder; ``push`` samples at ``sample_rate`` (default the codec's)."""
        return TinyStreamingEncoder(self, sample_rate)

    def streaming_decoder(self) -> TinyStreamingDecoder:
        """A fresh streaming decoder whose steps concatenate to ``decode``'s output."""
        return TinyStreamingDecoder(self)

    # ----- fitting and storage -----
    @classmethod
    def fit(
        cls,
        wavs: Iterable[np.ndarray],
        cfg: CodecConfig | None = None,
        progress: bool = True,
        sample_rate: int | None = None,
        labelled: Iterable[Utterance] | None = None,
    ) -> TinyCodec:
        """Fit the codebooks on speech (mono arrays at ``sample_rate``), up to ``cfg.fit_seconds``.

        A phonetic codec (``cfg.semantic == "phonetic"``) also needs speech whose phonemes are
        known: ``labelled`` TTS utterances (``world.speech.synthesize`` records them), by default
        ``cfg.phone_sentences`` sentences of ``fitting_utterances``.
        """
        from tqdm.auto import tqdm

        cfg = cfg or CodecConfig.tiny()
        probe = cls(cfg, {k: np.zeros(s) for k, s in cls.table_shapes(cfg).items()})
        feats: list[Features] = []
        total = 0.0
        bar = tqdm(
            total=cfg.fit_seconds, unit="s", desc="tiny codec: analysing", disable=not progress
        )
        for w in wavs:
            f = probe.features(w, sample_rate)
            feats.append(f)
            sec = f.energy.shape[0] / cfg.frame_rate
            bar.update(min(sec, cfg.fit_seconds - total))
            total += sec
            if total >= cfg.fit_seconds:
                break
        bar.close()
        if not feats:
            raise ValueError("TinyCodec.fit: no audio was given")
        f = Features(
            *(
                np.concatenate([getattr(g, n) for g in feats])
                for n in ("logf0", "voicing", "energy", "shape")
            )
        )
        phone_tables: dict[str, np.ndarray] = {}
        inventory: list[str] = []
        if cfg.semantic == "phonetic":
            if labelled is None:
                labelled = fitting_utterances(cfg.phone_sentences, seed=cfg.seed)
            phone_tables, inventory = _fit_phone_classifier(probe, list(labelled), cfg, progress)
        tables = cls._fit_tables(f, cfg, progress, phone_tables)
        return cls(cfg, tables, phone_inventory=inventory)

    @staticmethod
    def _fit_tables(
        f: Features, cfg: CodecConfig, progress: bool, phone_tables: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        from tqdm.auto import tqdm

        C, S = cfg.cardinality, cfg.subframes
        D = cfg.n_cepstra - 1
        live = ~f.silent
        keep = live.any(-1)
        if not keep.any():
            raise ValueError("TinyCodec.fit: the audio is all silence; fit on speech")
        rng_seed = cfg.seed
        steps = tqdm(total=cfg.num_codebooks - 1, desc="tiny codec: k-means", disable=not progress)
        mean_shape = _mean_shape(f)
        semantic = np.zeros((C, D))
        tables: dict[str, np.ndarray] = dict(phone_tables)
        if cfg.semantic == "kmeans":
            semantic[1:] = _kmeans(mean_shape[keep], C - 1, cfg.kmeans_iters, rng_seed)
            sem_code = _nearest(mean_shape[keep], semantic)
        else:  # cluster the phone posteriors; each code's envelope is its frames' mean
            T, S_, _ = f.shape.shape
            x = _phone_inputs(f.shape.reshape(T * S_, D), None, cfg.phone_context)
            post = _phone_mlp(phone_tables, x).reshape(T, -1)[keep]
            centres = np.zeros((C, post.shape[1]))
            centres[1:] = _kmeans(post, C - 1, cfg.kmeans_iters, rng_seed)
            tables["phone_post"] = centres
            sem_code = 1 + _nearest(post, centres[1:])
            counts = np.bincount(sem_code, minlength=C)
            sums = np.zeros((C, D))
            np.add.at(sums, sem_code, mean_shape[keep])
            semantic[1:] = sums[1:] / np.maximum(counts[1:, None], 1)
        steps.update()
        # F0 contour + voicing pattern, relative to the quantised frame mean.
        f0_code, feat = _pitch_targets(f, _f0_levels(cfg))
        contour = np.zeros((C, 2 * S))
        contour[1:] = _kmeans(feat[f0_code > 0], C - 1, cfg.kmeans_iters, rng_seed + 1)
        steps.update()
        energy = np.full((C, S), FLOOR_DB)
        e = _kmeans(f.energy[keep], C - 1, cfg.kmeans_iters, rng_seed + 2)
        energy[1:] = e[np.argsort(e.mean(-1), kind="stable")]  # code order = loudness order
        steps.update()
        tables |= {"semantic": semantic, "contour": contour, "energy": energy}
        resid = np.where(live[keep][..., None], f.shape[keep] - semantic[sem_code][:, None], 0.0)
        resid = resid.reshape(len(resid), S * D)
        stages = np.zeros((cfg.num_codebooks - 4, C, S * D))
        for k in range(cfg.num_codebooks - 4):
            stages[k, 1:] = _kmeans(resid, C - 1, cfg.kmeans_iters, rng_seed + 3 + k)
            resid = resid - stages[k][_nearest(resid, stages[k])]
            steps.update()
        steps.close()
        tables["residual"] = stages
        return tables

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the tables (safetensors) and the config (JSON) into ``directory``, atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        with atomic_path(d / TABLES_FILE) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in self.tables.items()}, str(tmp))
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": "tiny",
            "config": asdict(self.cfg),
            "dsp": _dsp_constants(),
            "table_shapes": {k: list(v.shape) for k, v in self.tables.items()},
            "tables_sha256": sha256_file(d / TABLES_FILE),
            "phones": self.phone_inventory,
        }
        with atomic_path(d / CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike[str], cfg: CodecConfig | None = None) -> TinyCodec:
        """Read a codec written by ``save``; with ``cfg``, check it was fitted with that config."""
        d = Path(directory)
        meta_path, tab_path = d / CONFIG_FILE, d / TABLES_FILE
        if not meta_path.exists() or not tab_path.exists():
            raise FileNotFoundError(
                f"{d} holds no fitted tiny codec ({CONFIG_FILE} + {TABLES_FILE}); fit one first"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path} is not valid JSON ({e}); refit the codec") from e
        if meta.get("format_version") != FORMAT_VERSION or meta.get("kind") != "tiny":
            raise ValueError(
                f"{meta_path}: format {meta.get('format_version')!r} kind {meta.get('kind')!r}, "
                f"this code reads format {FORMAT_VERSION} kind 'tiny'; refit the codec"
            )
        try:
            saved = CodecConfig(**meta["config"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{meta_path}: the stored config is not valid ({e}); refit") from e
        if meta.get("tables_sha256") != sha256_file(tab_path):
            raise ValueError(f"{tab_path} does not match {meta_path} (interrupted save?); refit")
        if cfg is not None:
            diff = {
                k: (v, getattr(cfg, k))
                for k, v in asdict(saved).items()
                if k != "mimi_path" and getattr(cfg, k) != v
            }
            if diff:
                raise ValueError(
                    f"{d}: the codec was fitted with a different config "
                    f"(field: saved vs wanted) {diff}; refit it or load without cfg"
                )
        if meta.get("dsp") != _dsp_constants():
            raise ValueError(f"{d}: fitted with other DSP settings {meta.get('dsp')}; refit it")
        tables = load_file(str(tab_path))
        return cls(saved, tables, phone_inventory=meta.get("phones", []))


def _dsp_constants() -> dict[str, Any]:
    """The analysis settings a fitted codec depends on (saved with it, checked on load)."""
    return {
        "N_FFT": N_FFT,
        "FLOOR_DB": FLOOR_DB,
        "YIN_THRESHOLD": YIN_THRESHOLD,
        "YIN_WINDOW": YIN_WINDOW,
        "VOICING_APER": VOICING_APER,
        "VOICED_MIN_DB": VOICED_MIN_DB,
        "F0_CONTEXT": F0_CONTEXT,
        "F0_OUTLIER": F0_OUTLIER,
        "MEL_FLOOR": MEL_FLOOR,
        "VOICING_WEIGHT": VOICING_WEIGHT,
    }


@dataclass
class _SynthState:
    """What the causal synthesiser carries from one frame to the next."""

    logf0: float  # last voiced log-F0 (held through unvoiced stretches)
    voicing: float
    energy: float
    shape: np.ndarray
    phase: float
    sample: int  # absolute sample index (noise table position)
    tail: np.ndarray  # overlap-add tail of the block filters


class _Synth:
    """Causal source-filter synthesis from point features (pulse/noise, min-phase block filters)."""

    def __init__(self, cfg: CodecConfig, an: _Analyzer) -> None:
        self.cfg = cfg
        self.S = an.S
        k = 1
        while self.S % k or self.S // k > 128:
            k += 1
        self.blocks_per_point = k
        self.h = self.S // k
        self.n_fft = 8 * self.h
        sr = cfg.sample_rate
        mel_c = librosa.mel_frequencies(cfg.n_mels + 2, fmin=0.0, fmax=sr / 2)[1:-1]
        lin = np.fft.rfftfreq(self.n_fft, 1.0 / sr)
        mm, ml = librosa.hz_to_mel(mel_c), librosa.hz_to_mel(lin)
        eye = np.eye(cfg.n_mels)
        self.interp = np.stack([np.interp(ml, mm, eye[i]) for i in range(cfg.n_mels)], axis=1)
        wts = np.full(len(lin), 2.0)
        wts[0] = 1.0
        if self.n_fft % 2 == 0:
            wts[-1] = 1.0
        self.bin_weights = wts / self.n_fft  # two-sided mean of a one-sided power spectrum
        # Envelope shape (c1..) -> log power per linear bin, and -> minimum phase (the Hilbert
        # transform of the log amplitude, by folding its cepstrum): both linear, so precomputed.
        basis = np.zeros((cfg.n_cepstra - 1, cfg.n_mels))
        basis[np.arange(cfg.n_cepstra - 1), np.arange(1, cfg.n_cepstra)] = 1.0
        self.to_logspec = scipy.fft.idct(basis, type=2, norm="ortho", axis=-1) @ self.interp.T
        fold = np.zeros(self.n_fft)
        fold[0] = 1.0
        fold[1 : (self.n_fft + 1) // 2] = 2.0
        if self.n_fft % 2 == 0:
            fold[self.n_fft // 2] = 1.0
        cep = np.fft.irfft(0.5 * self.to_logspec, self.n_fft, axis=-1) * fold
        self.to_phase = np.fft.rfft(cep, axis=-1).imag
        # White noise, and the same noise above VOICED_CUTOFF_HZ only (circular, so seamless).
        noise = np.random.default_rng(NOISE_SEED).standard_normal(NOISE_TABLE)
        spec = np.fft.rfft(noise)
        spec[np.fft.rfftfreq(NOISE_TABLE, 1.0 / sr) < VOICED_CUTOFF_HZ] = 0.0
        high = np.fft.irfft(spec, NOISE_TABLE)
        self.high_noise = high.astype(np.float32)
        self.low_noise = (noise - high).astype(np.float32)
        self.default_logf0 = 0.5 * (math.log(cfg.fmin) + math.log(cfg.fmax))

    def initial_state(self) -> _SynthState:
        """The state before the first frame: silence."""
        return _SynthState(
            logf0=self.default_logf0,
            voicing=0.0,
            energy=FLOOR_DB,
            shape=np.zeros(self.cfg.n_cepstra - 1),
            phase=0.0,
            sample=0,
            tail=np.zeros(self.n_fft - self.h, dtype=np.float32),
        )

    def render(self, f: Features, st: _SynthState) -> tuple[np.ndarray, _SynthState]:
        """Samples for the frames of ``f`` following state ``st``; returns the new state."""
        cfg, S, h = self.cfg, self.S, self.h
        P = f.energy.size
        energy = f.energy.reshape(P)
        silent = energy <= FLOOR_DB
        voicing = np.where(silent, 0.0, f.voicing.reshape(P))
        voiced = voicing > 0
        shape = f.shape.reshape(P, -1)
        # Held log-F0: unvoiced points keep the last voiced value (causal).
        idx = np.where(voiced, np.arange(P), -1)
        idx = np.maximum.accumulate(idx)
        logf0_raw = f.logf0.reshape(P)
        held = np.where(idx >= 0, logf0_raw[np.maximum(idx, 0)], st.logf0)
        prev_held = np.concatenate([[st.logf0], held[:-1]])
        prev_voicing = np.concatenate([[st.voicing], voicing[:-1]])
        prev_voiced = prev_voicing > 0
        prev_energy = np.concatenate([[st.energy], energy[:-1]])
        prev_silent = prev_energy <= FLOOR_DB
        prev_shape = np.concatenate([st.shape[None], shape[:-1]])
        # Segment i runs from point i-1 to point i; F0 starts at the onset value after silence.
        f0_start = np.where(prev_voiced, prev_held, held)
        frac = (np.arange(S) + 1.0) / S
        logf0 = f0_start[:, None] + (held - f0_start)[:, None] * frac[None]
        # Voicing edges (tuned against pYIN): an onset ramps up over the first half of the segment,
        # an offset ramps down over its middle half.
        on = np.clip(2.0 * frac, 0.0, 1.0)
        off = np.clip(2.0 * frac - 0.5, 0.0, 1.0)
        ramp = np.where((voicing > prev_voicing)[:, None], on[None], off[None])
        v = prev_voicing[:, None] + (voicing - prev_voicing)[:, None] * ramp
        f0 = np.exp(logf0).reshape(-1)
        v = v.reshape(-1)
        sr = cfg.sample_rate
        phase = np.mod(st.phase + np.cumsum(2.0 * np.pi * f0 / sr), 2.0 * np.pi)
        # Band-limited pulse train: sum_{j=1..N} cos(j phase) in closed form (Dirichlet kernel)
        # up to VOICED_CUTOFF_HZ, each harmonic with the power white noise has in its band, plus
        # noise above: a flat, unit-power excitation. float32 (float64 trig is ~20x slower).
        ph = phase.astype(np.float32)
        n_h = np.maximum(np.floor(VOICED_CUTOFF_HZ / f0), 1.0).astype(np.float32)
        s = np.sin(0.5 * ph)
        small = np.abs(s) < 1e-6
        ratio = np.sin((n_h + 0.5) * ph) / np.where(small, 1.0, 2.0 * s)
        pulse = (np.where(small, n_h + 0.5, ratio) - 0.5) * np.sqrt(4.0 * f0 / sr).astype(
            np.float32
        )
        n = P * S
        pos = (st.sample + np.arange(n)) % NOISE_TABLE
        vp = (v * (1.0 - BREATH)).astype(np.float32)  # pulse share of the power below the cutoff
        exc = np.sqrt(vp) * pulse + np.sqrt(1.0 - vp) * self.low_noise[pos] + self.high_noise[pos]
        # Block filters: interpolate energy and shape at block centres, build min-phase filters.
        k = self.blocks_per_point
        bfrac = (np.arange(k) + 0.5) / k
        e_start = np.where(prev_silent, energy, prev_energy)
        e_end = np.where(silent, e_start, energy)
        sh_start = np.where(prev_silent[:, None], shape, prev_shape)
        sh_end = np.where(silent[:, None], sh_start, shape)
        eb = (e_start[:, None] + (e_end - e_start)[:, None] * bfrac[None]).reshape(-1)
        shb = sh_start[:, None] + (sh_end - sh_start)[:, None] * bfrac[None, :, None]
        shb = shb.reshape(P * k, -1)
        B = P * k
        active = np.flatnonzero(~np.repeat(prev_silent & silent, k))  # silent blocks stay zero
        Y = np.zeros((B, 8, h), dtype=np.float32)
        if active.size:
            shb, eb = shb[active], eb[active]
            logspec = shb @ self.to_logspec  # natural-log power per linear bin
            logspec -= logspec.max(axis=-1, keepdims=True)
            mean_pow = np.exp(logspec) @ self.bin_weights
            gain = np.log(10.0 ** (eb / 10.0) / mean_pow)  # unit-power input -> target power
            amp = np.exp(0.5 * (logspec + gain[:, None])).astype(np.float32)
            phase_h = (shb @ self.to_phase).astype(np.float32)
            H = np.empty(amp.shape, dtype=np.complex64)
            H.real = amp * np.cos(phase_h)
            H.imag = amp * np.sin(phase_h)
            E = scipy.fft.rfft(exc.reshape(B, h)[active], self.n_fft, axis=-1)
            Y[active] = scipy.fft.irfft(E * H, self.n_fft, axis=-1).reshape(-1, 8, h)
        out = np.zeros((B + 7, h), dtype=np.float32)
        for m in range(8):
            out[m : m + B] += Y[:, m]
        out = out.reshape(-1)
        out[: self.n_fft - h] += st.tail
        wav = np.clip(out[:n], -1.0, 1.0)  # re-encodable: encode takes [-1, 1]
        new = _SynthState(
            logf0=float(held[-1]),
            voicing=float(voicing[-1]),
            energy=float(energy[-1]),
            shape=shape[-1].copy(),
            phase=float(phase[-1]),
            sample=st.sample + n,
            tail=out[n:].copy(),
        )
        return wav, new


class TinyStreamingDecoder:
    """Decodes one frame of codes at a time; the steps concatenate to ``TinyCodec.decode``."""

    def __init__(self, codec: TinyCodec) -> None:
        self.codec = codec
        self.state = codec._syn.initial_state()

    def step(self, codes_frame: np.ndarray) -> np.ndarray:
        """``frame_size`` float32 samples for one frame of codes ``[K]``."""
        c = validate_frame(codes_frame, self.codec.num_codebooks, self.codec.cardinality)
        wav, self.state = self.codec._syn.render(self.codec.dequantise(c[:, None]), self.state)
        return wav


class TinyStreamingEncoder:
    """Encodes audio pushed in pieces; frames come out once their lookahead has arrived."""

    def __init__(self, codec: TinyCodec, sample_rate: int | None = None) -> None:
        self.codec = codec
        an = codec._an
        self._resampler = None
        if sample_rate is not None and sample_rate != codec.sample_rate:
            import soxr

            self._resampler = soxr.ResampleStream(
                sample_rate, codec.sample_rate, 1, dtype="float32"
            )
        self._buf = np.zeros(an.pad_left)  # left context of frame 0 is zeros, as in batch
        self._done = 0  # frames emitted
        self._history: np.ndarray | None = None  # envelopes of the last points (phone context)
        self._received = 0  # samples (at the codec rate) received
        self._flushed = False

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Add samples (any PCM dtype, mono/stereo); return codes ``[K, n]`` of completed frames."""
        if self._flushed:
            raise ValueError("this streaming encoder was flushed; start a new one")
        x = to_mono_float(samples, name="streamed audio").astype(np.float64)
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x.astype(np.float32)).astype(np.float64)
        self._buf = np.concatenate([self._buf, x])
        self._received += x.size
        F, an = self.codec.frame_size, self.codec._an
        ready = max(0, (self._received - an.lookahead - 1) // F - self._done)
        return self._emit(ready)

    def flush(self) -> np.ndarray:
        """Zero-pad what is pending to whole frames and return their codes ``[K, n]``."""
        if self._flushed:
            return np.zeros((self.codec.num_codebooks, 0), dtype=np.int64)
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            self._buf = np.concatenate([self._buf, tail.astype(np.float64)])
            self._received += tail.size
        self._flushed = True
        total = n_frames(self._received, self.codec.frame_size)
        return self._emit(total - self._done)

    def _emit(self, n: int) -> np.ndarray:
        """Codes of the next ``n`` frames (zero-padded past what was received); drop their audio."""
        codec, an, F = self.codec, self.codec._an, self.codec.frame_size
        if n <= 0:
            return np.zeros((codec.num_codebooks, 0), dtype=np.int64)
        need = an.pad_left + n * F + an.lookahead + 1
        xp = self._buf[:need]
        if xp.size < need:
            xp = np.concatenate([xp, np.zeros(need - xp.size)])
        feats = an.features(xp, n)
        codes = codec.quantise(feats, self._history)
        ctx = codec.cfg.phone_context
        if ctx:
            pts = feats.shape.reshape(-1, feats.shape.shape[-1])
            prev = self._history if self._history is not None else np.zeros((ctx, pts.shape[1]))
            self._history = np.concatenate([prev, pts])[-ctx:]
        self._buf = self._buf[n * F :]
        self._done += n
        return codes


# ----------------------------------------------------------------------------- fitting data

_SUBJECTS = (
    "the red star|a small blue circle|my brother|the old teacher|this green triangle|"
    "every yellow square|the purple heart|our neighbour|a tiny orange cross|the picture|"
    "that big black box|the white cloud|seven children|the quiet student|her grandmother|"
    "a friendly robot"
).split("|")
_VERBS = (
    "sits|was sitting|is hiding|moved quickly|looks|appears|seems|jumped|stays|will arrive|"
    "has been waiting|turned|sings|reads"
).split("|")
_PLACES = (
    "in the top left corner|next to the window|under the table|near the middle of the image|"
    "behind the yellow house|on the right side|at the bottom|above the sleeping cat|"
    "between two trees|by the river"
).split("|")
_EXTRAS = (
    "today|again|before lunch|after the storm|this morning|quietly|for three hours|"
    "with a smile|without a sound|every Thursday"
).split("|")
_QUESTIONS = (
    "what colour is the {o}?|how many {o}s can you see?|where is the {o}?|"
    "is the {o} bigger than the house?|can you describe the {o} for me?|"
    "why would anyone paint a {o} like that?|do you really think so?"
).split("|")
_OBJECTS = (
    "star|circle|triangle|square|heart|cross|apple|boat|flower|bicycle|mountain|window|"
    "umbrella|garden|number nine"
).split("|")
_CHAT = (
    "well, I think that is a wonderful idea!|oh no, I completely forgot about it.|"
    "yes, exactly, thank you very much.|hmm, let me think about that for a second.|"
    "really? that sounds amazing.|okay, see you tomorrow then.|"
    "I would rather stay at home and read a book.|the weather is lovely this week.|"
    "could you please say that again more slowly?|numbers like 42, 17 and 3.5 too."
).split("|")


def fitting_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` varied English sentences (statements, questions, chit-chat) for codec fitting."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for _ in range(n):
        kind = rng.integers(4)
        if kind == 0:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_PLACES)}"
            if rng.random() < 0.5:
                s += f" {rng.choice(_EXTRAS)}"
            s = s[0].upper() + s[1:] + "."
        elif kind == 1:
            q = str(rng.choice(_QUESTIONS)).format(o=rng.choice(_OBJECTS))
            s = q[0].upper() + q[1:]
        elif kind == 2:
            s = str(rng.choice(_CHAT))
            s = s[0].upper() + s[1:]
        else:
            a, b = rng.choice(_SUBJECTS, 2, replace=False)
            s = f"{a} {rng.choice(_VERBS)} {rng.choice(_PLACES)}, but {b} does not!"
            s = s[0].upper() + s[1:]
        out.append(s)
    return out


def fitting_speech(
    n_sentences: int, voices: Sequence[Voice] | None = None, seed: int = 0
) -> list[np.ndarray]:
    """Synthesise ``n_sentences`` varied sentences round-robin over ``voices`` (24 kHz float32).

    The default voices are the assistant's and the non-held-out user voices
    (``USER_VOICES[:-2]``), so the last two user voices stay unseen by the codec.
    """
    from moshivis_lab.world.speech import ASSISTANT_VOICE, USER_VOICES, synthesize

    if voices is None:
        voices = (ASSISTANT_VOICE, *USER_VOICES[:-2])
    sents = fitting_sentences(n_sentences, seed)
    # Resampling espeak's int16 output can overshoot full scale by ~1 %: clip it back.
    return [
        np.clip(synthesize(s, voices[i % len(voices)]).wav, -1.0, 1.0) for i, s in enumerate(sents)
    ]


def _frame_phones(
    codec: TinyCodec, utterances: Sequence[Utterance]
) -> tuple[list[int], list[str], int, int]:
    """Codebook-0 code and majority phone of each speaking frame; classifier hits and points."""
    point = codec.frame_size // codec.subframes
    phonetic = codec.cfg.semantic == "phonetic"
    names = np.array(codec.phone_inventory + ["?"] * codec.cfg.phone_classes, dtype=object)
    hits, n_pts, frame_codes, frame_phones = 0, 0, [], []
    for u in utterances:
        f = codec.features(u.wav, int(u.sample_rate))
        T, S, _ = f.shape.shape
        lab = np.array(point_phones(u, T * S, point), dtype=object).reshape(T, S)
        lab[f.silent] = PHONE_SILENCE
        speaking = lab != PHONE_SILENCE
        n_pts += int(speaking.sum())
        if phonetic:
            pred = codec.phone_posteriors(f).argmax(-1)
            hits += int((names[pred][speaking] == lab[speaking]).sum())
        codes = codec.quantise(f)[0]
        for t in range(T):
            ph = [p for p in lab[t] if p != PHONE_SILENCE]
            if ph:
                frame_codes.append(int(codes[t]))
                frame_phones.append(max(sorted(set(ph)), key=ph.count))
    return frame_codes, frame_phones, hits, n_pts


def phone_accuracy(
    codec: TinyCodec,
    utterances: Sequence[Utterance],
    reference: Sequence[Utterance] | None = None,
) -> dict[str, float]:
    """How phonetic codebook 0 is, on TTS utterances whose phonemes are known.

    ``classifier`` (phonetic codecs): share of speaking points whose most likely phone is right.
    ``code0``: share of speaking frames whose majority phone is the one their code stands for,
    each code standing for its most frequent phone in ``reference`` (e.g. the same sentences
    by a training voice, so that this measures whether an unseen voice's sounds get the codes
    a known voice's get) or, without it, in ``utterances`` themselves (the codes' purity).
    ``chance``: always answering the commonest phone.
    """
    codes, phones, hits, n_pts = _frame_phones(codec, utterances)
    if not n_pts:
        raise ValueError("phone_accuracy: the utterances hold no speech")
    ref_codes, ref_phones = (
        (codes, phones) if reference is None else _frame_phones(codec, reference)[:2]
    )
    by_code: dict[int, list[str]] = {}
    for c, p in zip(ref_codes, ref_phones, strict=True):
        by_code.setdefault(c, []).append(p)
    meaning = {c: max(sorted(set(ps)), key=ps.count) for c, ps in by_code.items()}
    commonest = max(sorted(set(phones)), key=phones.count)
    right = sum(meaning.get(c) == p for c, p in zip(codes, phones, strict=True))
    return {
        "classifier": round(hits / n_pts, 4) if codec.cfg.semantic == "phonetic" else float("nan"),
        "code0": round(right / len(phones), 4),
        "chance": round(phones.count(commonest) / len(phones), 4),
    }


def fitting_utterances(
    n_sentences: int,
    voices: Sequence[Voice] | None = None,
    seed: int = 0,
    texts: Sequence[str] | None = None,
) -> list[Utterance]:
    """TTS utterances (with words and phonemes) of ``texts`` or ``fitting_sentences``.

    Voices go round-robin; by default the assistant's and the non-held-out user voices.
    """
    from moshivis_lab.world.speech import ASSISTANT_VOICE, USER_VOICES, synthesize

    if voices is None:
        voices = (ASSISTANT_VOICE, *USER_VOICES[:-2])
    sents = list(texts)[:n_sentences] if texts is not None else fitting_sentences(n_sentences, seed)
    return [synthesize(s, voices[i % len(voices)]) for i, s in enumerate(sents)]


def fit_on_utterances(
    utterances: Iterable[Utterance | np.ndarray],
    cfg: CodecConfig | None = None,
    progress: bool = True,
) -> TinyCodec:
    """Fit a tiny codec on ``world.speech.Utterance`` objects (or plain 24 kHz arrays)."""
    cfg = cfg or CodecConfig.tiny()

    utterances = list(utterances)

    def wavs() -> Iterable[np.ndarray]:
        for u in utterances:
            if hasattr(u, "wav"):
                yield prepare_input(
                    u.wav, int(getattr(u, "sample_rate", cfg.sample_rate)), cfg.sample_rate
                )
            else:
                yield np.asarray(u)

    labelled = [u for u in utterances if getattr(u, "phonemes", None)]
    return TinyCodec.fit(wavs(), cfg, progress=progress, labelled=labelled or None)
