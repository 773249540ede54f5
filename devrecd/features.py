"""The paper's 73-dim "timing tandem" frontend: ONE implementation for training and serving.

Per frame, in this order (``../shared/design/paper-model.md``, Algorithm 1 of the paper)::

    [ 0:12]  MFCC c1..c12        DCT-II (orthonormal) of the log mel energies, c0 dropped
    [12:13]  logE                log of the windowed, pre-emphasised frame's energy
    [13:26]  delta               of the 13 above (HTK regression, +-DELTA_WIDTH frames)
    [26:39]  delta-delta         delta of the delta
    [39:73]  pre-Fbank           the 34 mel filterbank energies BEFORE the log

A clip of ``clip_seconds`` is cut into exactly ``n_frames`` frames: frame hop is
``clip_samples // n_frames`` and each frame is ``frame_length`` samples long (default two hops,
so frames overlap by half and every sample is seen twice). The clip is pre-emphasised, then
reflect-padded by ``(frame_length - hop) / 2`` on each side so that frame ``i`` is centred on
sample ``(i + 0.5) * hop``. All of this lives in :class:`FrontendConfig`, which is written into
every checkpoint and model contract so that serving can never drift from training.

The module is written once against the array API standard: the same code runs on numpy
(serving, and training on the CPU: no torch needed) and on torch tensors (a CUDA GPU). Features are float32 throughout; the pre-Fbank energies span many decades and overflow fp16,
so normalisation (stored with the model) happens in fp32 before any half-precision layer.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import asdict, dataclass, fields
from typing import Annotated, Any, ClassVar, Literal

import numpy as np

from devrecd.errors import ConfigError
from devrecd.features_numpy import NumpyPath, cpu_chunk
from devrecd.validation import Count, PositiveFloat, Range, Section

N_FRAMES = 128  # frames per clip (the network's time axis)
N_MFCC = 12  # c1..c12
N_MELS = 34  # pre-Fbank bands
N_BASE = N_MFCC + 1  # MFCC + logE = 13
FEATURE_DIM = N_MFCC + 1 + N_BASE + N_BASE + N_MELS  # 12 + 1 + 13 + 13 + 34 = 73

# Named slices of the feature axis, for readers and tests.
SLICE_MFCC = slice(0, N_MFCC)
SLICE_LOGE = slice(N_MFCC, N_BASE)
SLICE_DELTA = slice(N_BASE, 2 * N_BASE)
SLICE_DELTA2 = slice(2 * N_BASE, 3 * N_BASE)
SLICE_FBANK = slice(3 * N_BASE, FEATURE_DIM)
Level = Literal["clip", "none"]  # FrontendConfig.level


@dataclass(frozen=True)
class FrontendConfig(Section):
    """Every parameter of the frontend (``[frontend]``). Serialised with models; compared before serving.

    Checked like every configuration section (:mod:`devrecd.validation`: ``frontend.key must ...,
    got ...``) wherever it is made: the configuration, or an artifact (checkpoint, contract, scorer,
    registry), whose reader names the artifact in its error."""

    section: ClassVar[str] = "frontend"
    sample_rate: Annotated[int, Range(gt=0)] = 32000  # Hz; the model's rate (CCNU_Mobile is 32 kHz)
    clip_seconds: PositiveFloat = 2.0  # one network input covers this much audio
    n_frames: int = N_FRAMES
    frame_length: int = 0  # samples per frame; 0 = 2 x hop
    n_fft: int = 0  # FFT size; 0 = next power of two >= frame_length
    window: Literal["hamming", "hann"] = "hamming"  # symmetric Hamming (the paper's choice)
    preemphasis: Annotated[float, Range(ge=0, lt=1)] = 0.97
    n_mels: int = N_MELS
    n_mfcc: int = N_MFCC
    fmin: float = 0.0
    fmax: float = 0.0  # 0 = Nyquist
    delta_width: Count = 2  # HTK regression half-width N
    # energies are clamped here before log (relative to the clip's level with level="clip"); log(0) is
    # -inf: every clip would then fail as non-finite features
    log_floor: PositiveFloat = 1e-12
    # "clip": every energy of a clip is divided by the clip's mean frame energy before anything else
    # reads it, so that logE and the pre-Fbank energies (the only level-bearing dims) do not move with
    # gain: recording level is not a device trace. "none": absolute energies (input in [-1, 1]), what
    # every model and scorer made before this parameter existed computed (see :meth:`from_dict`).
    level: Level = "clip"

    def relations(self) -> list[str]:
        problems = []
        if self.n_frames != N_FRAMES:
            problems.append(f"frontend.n_frames must be {N_FRAMES} (the network's time axis), got {self.n_frames!r}")
        if self.n_mels != N_MELS or self.n_mfcc != N_MFCC:
            problems.append(f"frontend.n_mels/n_mfcc must be {N_MELS}/{N_MFCC} (73-dim features), "
                            f"got {self.n_mels!r}/{self.n_mfcc!r}")
        if problems:
            return problems
        hop = self.hop_length
        if hop < 16:
            problems.append(f"frontend.clip_seconds is too short for {self.n_frames} frames (hop {hop} samples)")
        if self.frame_length and self.frame_length < hop:
            problems.append(f"frontend.frame_length must be >= the frame hop ({hop}) or 0 for automatic, "
                            f"got {self.frame_length!r}")
        if self.n_fft and self.n_fft < self.win_length:
            problems.append(f"frontend.n_fft must be >= frame_length ({self.win_length}) or 0 for automatic, "
                            f"got {self.n_fft!r}")
        if self.n_fft % 2:
            # the Parseval weights count the last rfft bin once, as the Nyquist bin of an even size
            problems.append(f"frontend.n_fft must be even (or 0 for automatic), got {self.n_fft}")
        top = self.fmax or self.sample_rate / 2
        if not 0 <= self.fmin < top <= self.sample_rate / 2:
            problems.append(f"frontend.fmin/fmax must be 0 <= fmin < fmax <= sample_rate / 2, "
                            f"got {self.fmin!r}/{self.fmax!r}")
        return problems

    # --- derived sizes -------------------------------------------------------------------
    @property
    def clip_samples(self) -> int:
        """Samples in one clip (network input)."""
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def hop_length(self) -> int:
        """Samples between consecutive frames."""
        return self.clip_samples // self.n_frames

    @property
    def win_length(self) -> int:
        """Samples per frame."""
        return self.frame_length or 2 * self.hop_length

    @property
    def fft_size(self) -> int:
        return self.n_fft or 1 << (self.win_length - 1).bit_length()

    @property
    def top_frequency(self) -> float:
        return self.fmax or self.sample_rate / 2

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.level == "none":
            # Written as artifacts made before ``level`` existed were: their recorded frontend and
            # fingerprint stay valid, and they are served with the features they were made with.
            del d["level"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrontendConfig:
        """The frontend an artifact (checkpoint, contract, scorer, registry) recorded. One recorded
        without ``level`` predates level normalisation: it computed absolute energies (``"none"``)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"frontend: unknown parameter(s) {', '.join(unknown)}")
        return cls(**{"level": "none", **data})

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of every parameter: equal iff the features are equal."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe_mismatch(self, other: FrontendConfig) -> str:
        """Human list of the parameters that differ (empty when equal)."""
        a, b = asdict(self), asdict(other)  # every parameter: to_dict() leaves out level "none"
        return ", ".join(f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k])


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(cfg: FrontendConfig) -> np.ndarray:
    """(n_mels, n_fft//2+1) triangles with unit peaks on the HTK mel scale (no area norm)."""
    n_bins = cfg.fft_size // 2 + 1
    bin_hz = np.arange(n_bins) * cfg.sample_rate / cfg.fft_size
    edges = mel_to_hz(np.linspace(hz_to_mel(cfg.fmin), hz_to_mel(cfg.top_frequency), cfg.n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bin_hz[None, :] - lower) / (centre - lower)
    falling = (upper - bin_hz[None, :]) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling))


def dct_matrix(n_in: int) -> np.ndarray:
    """Orthonormal DCT-II as a matrix (rows = coefficients), equal to scipy's norm='ortho'."""
    n = np.arange(n_in)
    k = n[:, None]
    mat = np.cos(math.pi * k * (2 * n[None, :] + 1) / (2 * n_in)) * math.sqrt(2.0 / n_in)
    mat[0] /= math.sqrt(2.0)
    return mat


def frame_window(cfg: FrontendConfig) -> np.ndarray:
    """Symmetric analysis window of ``win_length`` samples."""
    n = cfg.win_length
    return np.hamming(n) if cfg.window == "hamming" else np.hanning(n)


def array_namespace(x: Any) -> Any:
    """The array-API namespace of ``x`` (numpy for numpy arrays; torch's, on any device, for tensors)."""
    if isinstance(x, np.ndarray):
        return np  # numpy >= 2.1 implements the standard itself (array_api_compat.numpy imports 0.3 s more)
    from array_api_compat import array_namespace as namespace

    return namespace(x)


class Frontend:
    """Waveform clips -> (B, 128, 73) float32 features, in the array library and on the device of the clips.

    ``Frontend(cfg)(waves)`` takes (B, clip_samples) or (clip_samples,) float clips in [-1, 1]: a numpy
    array gives a numpy array (serving: no torch needed), a torch tensor gives a tensor on the same
    device (training, and the CUDA frontend of GPU serving). Both run the one implementation below,
    written against the array API standard (``array-api-compat`` gives numpy and torch one
    namespace), so the two cannot drift apart. Constant tables are cached per library and device.
    """

    def __init__(self, cfg: FrontendConfig | None = None) -> None:
        self.cfg = cfg or FrontendConfig()
        self._window = frame_window(self.cfg).astype(np.float32)
        # Mel matrix (bins, mels) with one extra column of Parseval weights, so the same matmul
        # also yields each frame's energy: sum_n w[n]^2 y[n]^2 = (P_0 + 2 sum_k P_k + P_N/2) / N.
        mel = mel_filterbank(self.cfg).T
        parseval = np.full((mel.shape[0], 1), 2.0 / self.cfg.fft_size)
        parseval[0] = parseval[-1] = 1.0 / self.cfg.fft_size
        self._mel = np.hstack([mel, parseval]).astype(np.float32)
        self._dct = dct_matrix(self.cfg.n_mels)[1 : self.cfg.n_mfcc + 1].T.astype(np.float32)
        # numpy (serving): the same steps up to the pre-Fbank energies through a per-thread workspace
        self._numpy = NumpyPath(self.cfg, self._window, self._mel, self._padding)
        # Sample index of every frame's every sample in the padded clip, flattened: framing as one gather.
        cfg = self.cfg
        starts = np.arange(cfg.n_frames)[:, None] * cfg.hop_length
        self._frame_index = (starts + np.arange(cfg.win_length)[None, :]).reshape(-1)
        self._tables: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        self._lock = threading.Lock()

    def _tables_on(self, xp: Any, device: Any) -> tuple[Any, Any, Any, Any]:
        key = (xp.__name__, str(device))
        tables = self._tables.get(key)
        if tables is None:
            tables = tuple(xp.asarray(t, device=device)
                           for t in (self._window, self._mel, self._dct, self._frame_index))
            with self._lock:
                self._tables[key] = tables
        return tables

    def __call__(self, waves: Any) -> Any:
        if not hasattr(waves, "__array_namespace__") and not hasattr(waves, "detach"):
            waves = np.asarray(waves)
        if isinstance(waves, np.ndarray):
            waves = np.ascontiguousarray(waves, dtype=np.float32)
        xp = array_namespace(waves)
        if waves.ndim == 1:
            waves = waves[None]
        cfg = self.cfg
        if waves.shape[-1] != cfg.clip_samples:
            raise ValueError(f"clips must have {cfg.clip_samples} samples, got {waves.shape[-1]}")
        if waves.dtype != xp.float32:
            waves = xp.astype(waves, xp.float32)
        if hasattr(waves, "detach"):  # torch: no autograd graph for features
            import torch

            with torch.no_grad():
                return self._features(xp, waves)
        return self._features(xp, waves)

    def _features(self, xp: Any, x: Any) -> Any:
        """The 73 dims of float32 clips ``x`` (B, clip_samples), with the array library ``xp``."""
        from array_api_compat import device as device_of
        from array_api_compat import is_numpy_namespace

        cfg = self.cfg
        window, mel, dct, frame_index = self._tables_on(xp, device_of(x))
        win, n, batch = cfg.win_length, cfg.clip_samples, x.shape[0]
        if is_numpy_namespace(xp):
            # The same steps through a per-thread workspace (features_numpy), a few clips at a time.
            step = cpu_chunk(cfg)
            if batch <= step:
                return self._from_fbank(np, self._numpy(x), dct)
            return np.concatenate([self._from_fbank(np, self._numpy(x[i : i + step]), dct)
                                   for i in range(0, batch, step)])

        # Pre-emphasis y[n] = x[n] - a x[n-1] over the whole clip (y[0] = x[0]).
        mid = xp.concat([x[:, :1], x[:, 1:] - cfg.preemphasis * x[:, :-1]], axis=1)
        # Centre frame i on sample (i + 0.5) * hop: reflect-pad the pre-emphasised clip by
        # ``left`` at the start and enough at the end that there are always n_frames frames.
        left, right = self._padding
        y = xp.concat([xp.flip(mid[:, 1 : left + 1], axis=1), mid, xp.flip(mid[:, n - right - 1 : n - 1], axis=1)],
                      axis=1)
        frames = xp.reshape(xp.take(y, frame_index, axis=1), (batch, cfg.n_frames, win)) * window
        spec = xp.fft.rfft(frames, n=cfg.fft_size, axis=-1)
        power = xp.real(spec) ** 2 + xp.imag(spec) ** 2  # |FFT|^2
        # pre-Fbank (before the log) and frame energy: (B, T, 34 + 1)
        return self._from_fbank(xp, xp.matmul(power, mel), dct)

    @property
    def _padding(self) -> tuple[int, int]:
        """Reflect-padding (left, right) of the pre-emphasised clip: frame i is centred on sample
        (i + 0.5) * hop, and there are always n_frames frames."""
        cfg = self.cfg
        left = (cfg.win_length - cfg.hop_length) // 2
        return left, max(0, (cfg.n_frames - 1) * cfg.hop_length + cfg.win_length - cfg.clip_samples - left)

    def _from_fbank(self, xp: Any, fbank_energy: Any, dct: Any) -> Any:
        """The 73 dims from the pre-Fbank energies and the frame energy (B, T, 34 + 1), any array library."""
        cfg = self.cfg
        if cfg.level == "clip":
            # Gain g multiplies every energy by g^2: divided by the clip's mean frame energy, logE and
            # the pre-Fbank energies no longer move with level (c1..c12 and the deltas never did).
            # A digitally silent clip (mean 0) stays at zero, i.e. at the log floor.
            level = xp.mean(fbank_energy[..., -1:], axis=-2, keepdims=True)  # (B, 1, 1)
            fbank_energy = fbank_energy / xp.where(level > 0, level, xp.ones_like(level))
        fbank = fbank_energy[..., :-1]
        mfcc = xp.matmul(xp.log(xp.clip(fbank, cfg.log_floor, None)), dct)  # (B, T, 12): c1..c12
        log_e = xp.log(xp.clip(fbank_energy[..., -1:], cfg.log_floor, None))
        base = xp.concat([mfcc, log_e], axis=-1)  # (B, T, 13)
        d1 = delta(base, cfg.delta_width)
        d2 = delta(d1, cfg.delta_width)
        return xp.concat([base, d1, d2, fbank], axis=-1)


def delta(feat: Any, width: int = 2) -> Any:
    """HTK regression deltas along axis -2 (time), edges replicated (numpy or torch, as given).

    d_t = sum_{n=1..N} n (c_{t+n} - c_{t-n}) / (2 sum_{n=1..N} n^2)
    """
    xp = array_namespace(feat)
    t = feat.shape[-2]
    edge = (*feat.shape[:-2], width, feat.shape[-1])
    padded = xp.concat([xp.broadcast_to(feat[..., :1, :], edge), feat, xp.broadcast_to(feat[..., -1:, :], edge)],
                       axis=-2)
    out = xp.zeros_like(feat)
    for n in range(1, width + 1):
        out = out + n * (padded[..., width + n : width + n + t, :] - padded[..., width - n : width - n + t, :])
    return out / (2 * sum(n * n for n in range(1, width + 1)))


def extract(clips: np.ndarray, frontend: Frontend, *, device: str = "cpu", chunk: int | None = None) -> np.ndarray:
    """Features for an (n, clip_samples) array of clips, as a float32 numpy array (n, 128, 73).

    On the CPU this is numpy (no torch needed), in small chunks (about 1 MB of FFT input: one 10 s
    clip, four 2 s clips; their spectra stay in cache); on a GPU the same code runs on torch tensors
    in large batches.
    """
    clips = np.asarray(clips, dtype=np.float32)
    if clips.ndim == 1:
        clips = clips[None]
    on_cpu = str(device) == "cpu"
    if chunk is None:
        chunk = cpu_chunk(frontend.cfg) if on_cpu else 256
    out = np.empty((len(clips), frontend.cfg.n_frames, FEATURE_DIM), dtype=np.float32)
    for start in range(0, len(clips), chunk):
        batch = clips[start : start + chunk]
        if on_cpu:
            out[start : start + chunk] = frontend(batch)
        else:
            import torch

            out[start : start + chunk] = frontend(torch.from_numpy(batch).to(device)).cpu().numpy()
    return out
