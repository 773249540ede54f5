"""The data of a training run: datasets opened, merged and restricted, every recording's window
features read before any epoch (unusable ones named or left out), normalised into tensors, and the
per-epoch augmentation. :mod:`devrecd.train` runs the loop over them; :mod:`devrecd.evaluation`
reads a split the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from devrecd.config import Config
from devrecd.data import Dataset, FeatureCache, Item, parse_split_groups
from devrecd.errors import DatasetError
from devrecd.stages import clips_for, frontend_for, hop_samples


@dataclass
class SplitData:
    """One split's windows, normalised, as tensors; ``rec`` maps each window to its recording."""

    x: Any  # torch.FloatTensor (n, 128, 73)
    y: Any  # torch.LongTensor (n,)
    rec: np.ndarray  # (n,) index into ``items``
    items: list[Item]

    def __len__(self) -> int:
        return int(self.y.shape[0])


def open_dataset(path: str | Path, cfg: Config, split_groups: str | None = None) -> Dataset:
    """Load ``path`` with the ``[train]`` split ratios and seed, or the given group split."""
    from devrecd.data import load_dataset

    return load_dataset(path, ratios=cfg.train.split, seed=cfg.train.seed, split_by_group=parse_split_groups(split_groups))


def merge_datasets(datasets: Sequence[Dataset]) -> Dataset:
    """Several datasets as one training set (e.g. real phones plus ``devrecd synth`` corpora).

    Each keeps its own split; with more than one, device names are prefixed with the dataset's
    folder name so that two corpora's ``phone1`` stay two devices.
    """
    import os

    from devrecd.data import listing_sha256

    if not datasets:
        raise DatasetError("no dataset given", reason="dataset_missing")
    if len(datasets) == 1:
        return datasets[0]
    names = [d.root.name for d in datasets]
    if len(set(names)) != len(names):
        raise DatasetError(f"datasets with the same folder name cannot be told apart: {', '.join(names)}",
                           reason="dataset_names")
    items = tuple(replace(it, device=f"{d.root.name}/{it.device}") for d in datasets for it in d.items)
    root = Path(os.path.commonpath([str(d.root) for d in datasets]))
    return Dataset(root=root, items=items, labels=tuple(sorted({it.device for it in items})),
                   manifest_sha256=listing_sha256(items, root), layout="merged")


def restrict_dataset(ds: Dataset, devices: Sequence[str], split: str | None = None,
                     splits: Sequence[str] | None = None) -> Dataset:
    """The recordings of ``devices`` only (of ``splits`` only, when given), all assigned to ``split``
    when given: e.g. a protocol's development phones as one training set."""
    from devrecd.data import listing_sha256

    keep = set(devices)
    items = tuple(replace(it, split=split or it.split) for it in ds.items
                  if it.device in keep and (splits is None or it.split in splits))
    return replace(ds, items=items, labels=tuple(sorted({it.device for it in items})),
                   manifest_sha256=listing_sha256(items, ds.root))


def check_training_data(ds: Dataset) -> None:
    """Refuse data that cannot train a classifier, before any features are computed."""
    if len(ds.labels) < 2:
        raise DatasetError(f"{ds.root}: one device ({ds.labels[0] if ds.labels else 'none'}); "
                           "a device classifier needs recordings of at least two devices", reason="dataset_one_device")
    missing = [d for d, c in ds.counts().items() if c["train"] == 0]
    if missing:
        raise DatasetError(f"{ds.root}: device(s) {', '.join(missing[:5])} have no training recordings in this split "
                           "(add recordings or change the split)", reason="dataset_split")


UNUSABLE_FILE = "unusable.json"


def split_features(ds: Dataset, split: str, cache: FeatureCache, hop_seconds: float,
                   labels: Sequence[str], *, on_unusable: str = "fail",
                   unusable: list[dict[str, str]] | None = None,
                   on_recording: Callable[[str], None] | None = None) -> tuple[list[np.ndarray], list[Item]]:
    """Raw (unnormalised) window features of every recording of ``split`` (``on_recording(path)``
    after each: progress). Every file is read before any training starts. With ``on_unusable="fail"`` the files that cannot be used are named in ONE
    DatasetError; with ``"skip"`` they are left out and appended to ``unusable`` (path, device,
    split, reason, detail)."""
    from devrecd.audio import AudioError

    items = ds.subset(split)
    unknown = sorted({it.device for it in items} - set(labels))
    if unknown:
        raise DatasetError(f"device(s) {', '.join(unknown[:5])} of the {split} split are not among the model's "
                           f"{len(labels)} labels", reason="dataset_labels")
    feats, kept, bad = [], [], []
    for it in items:
        try:
            feats.append(cache.features(it.path, hop_seconds)[0])
            kept.append(it)
        except AudioError as exc:
            bad.append(f"{it.path.name} ({exc.reason}: {exc.detail})")
            if unusable is not None:
                unusable.append({"path": str(it.path), "device": it.device, "split": split, "reason": exc.reason,
                                 "detail": exc.detail})
        if on_recording is not None:
            on_recording(str(it.path))
    if bad and on_unusable != "skip":
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DatasetError(f"{len(bad)} {split} recording(s) cannot be used: {'; '.join(bad[:3])}{more} "
                           "(train.on_unusable = \"skip\" leaves them out)", reason="dataset_unreadable")
    return feats, kept


def training_snr_range(items: Sequence[Item], cache: FeatureCache, hop_seconds: float,
                       noise_snr_db: tuple[float, float] | None = None) -> dict[str, Any]:
    """The SNR range a network learns from ``items`` (its training recordings): each one's measured SNR
    (:meth:`FeatureCache.snr_db`: the condition every verdict states, cached beside the features), and
    with noise augmentation on (``noise_snr_db``: its range) the low end lowered to the augmentation's.

    ``validated_snr_db``: [low, high], what the checkpoint's meta and the export's contract record
    (a closed-set verdict on a noisier recording names no device); ``measured``: [low, high] of the
    recordings themselves; ``recordings``: how many; ``noise_augment_snr_db``: the augmentation's range or None.
    """
    snrs = [cache.snr_db(it.path, hop_seconds) for it in items]
    if not snrs:
        raise DatasetError("no training recordings to measure the SNR range of", reason="dataset_too_small")
    low, high = min(snrs), max(snrs)
    lowest = min(low, float(noise_snr_db[0])) if noise_snr_db is not None else low
    return {"validated_snr_db": [round(lowest, 1), round(high, 1)], "measured": [round(low, 1), round(high, 1)],
            "recordings": len(snrs), "noise_augment_snr_db": list(noise_snr_db) if noise_snr_db is not None else None}


def with_init_range(snr: dict[str, Any], init_snr_db: tuple[float, float] | None) -> dict[str, Any]:
    """A fine-tune's SNR range: ``snr`` (:func:`training_snr_range` of its own recordings) widened to
    the range its init checkpoint records (``init_snr_db``). The network it starts from learned on
    those recordings too (the layers a fine-tune freezes learned on nothing else), so its range is
    the union of both; recording only the fine-tune's own would hold a verdict to a narrower range
    than the network has seen.

    Adds ``init_validated_snr_db`` (the init's range, None: it records none) and, when None, ``note``:
    the range is then the run's own recordings' only, and the meta says so.
    """
    if init_snr_db is None:
        return {**snr, "init_validated_snr_db": None,
                "note": "the init checkpoint records no SNR range (trained before devrecd recorded it): "
                        "validated_snr_db is this fine-tune's own training recordings' range only"}
    own = snr["validated_snr_db"]
    union = [round(min(own[0], float(init_snr_db[0])), 1), round(max(own[1], float(init_snr_db[1])), 1)]
    return {**snr, "validated_snr_db": union, "init_validated_snr_db": [float(v) for v in init_snr_db]}


def snr_range_origin(validated: tuple[float, float], snr: dict[str, Any] | None) -> str:
    """Where each end of a checkpoint's ``validated`` SNR range comes from, in words, for ``devrecd
    export`` to say (``snr``: the meta's ``training_snr_db``, as :func:`training_snr_range` and
    :func:`with_init_range` made it); "" when the meta does not record it. Each end is named by the
    value it was taken from: the recordings' measured end first, so a tie names the recordings."""
    if not snr or "measured" not in snr:
        return ""
    measured, (low, high) = snr["measured"], validated
    init, noise = snr.get("init_validated_snr_db"), snr.get("noise_augment_snr_db")
    recordings = "the training recordings' measured SNR"
    lows = [(measured[0], recordings), (init[0] if init else None, "the init checkpoint's recorded range"),
            (noise[0] if noise else None, "the noise augmentation's low end, train.noise_augment_snr_db")]
    highs = [(measured[1], recordings), (init[1] if init else None, "the init checkpoint's recorded range")]
    ends = [next((why for value, why in candidates
                  if value is not None and round(float(value), 1) == round(end, 1)), "")
            for end, candidates in ((low, lows), (high, highs))]
    if not all(ends):
        return ""
    said = "; the init checkpoint records no range" if "init_validated_snr_db" in snr and init is None else ""
    if ends == [recordings, recordings]:
        return "the training recordings' measured SNR range" + said
    return (f"low end: {ends[0]}; high end: {ends[1]}; "
            f"the training recordings measured {measured[0]:.1f} to {measured[1]:.1f} dB")


def check_usable(ds: Dataset, train_items: Sequence[Item], unusable: Sequence[dict[str, str]]) -> None:
    """After unusable recordings were left out: every device must keep a training recording."""
    left = {it.device for it in train_items}
    empty = [d for d in ds.labels if d not in left]
    if empty:
        why = "; ".join(f"{Path(u['path']).name} ({u['reason']}: {u['detail']})" for u in unusable
                        if u["device"] in empty and u["split"] == "train")
        raise DatasetError(f"device(s) {', '.join(empty)} have no usable training recording left: {why}",
                           reason="dataset_unusable")


def to_split_data(feats: Sequence[np.ndarray], items: Sequence[Item], labels: Sequence[str],
                  mean: np.ndarray, std: np.ndarray) -> SplitData:
    """Normalised tensors of per-recording features."""
    import torch

    index = {d: i for i, d in enumerate(labels)}
    if not feats:
        return SplitData(torch.zeros(0, 128, len(mean)), torch.zeros(0, dtype=torch.long), np.zeros(0, np.int64), [])
    x = np.concatenate([(f - mean) / std for f in feats]).astype(np.float32, copy=False)
    y = np.concatenate([np.full(len(f), index[it.device]) for f, it in zip(feats, items)])
    rec = np.concatenate([np.full(len(f), i) for i, f in enumerate(feats)]).astype(np.int64)
    return SplitData(torch.from_numpy(x), torch.as_tensor(y, dtype=torch.long), rec, list(items))


def split_listing(ds: Dataset, train: Sequence[Item], val: Sequence[Item], hop_seconds: float) -> dict[str, Any]:
    """Each split's recordings as a checkpoint lists them: paths relative to the dataset's root."""
    def rel(it: Item) -> str:
        try:
            return it.path.relative_to(ds.root).as_posix()
        except ValueError:
            return it.path.as_posix()

    return {"train": [rel(it) for it in train], "val": [rel(it) for it in val],
            "test": [rel(it) for it in ds.subset("test")], "hop_seconds": hop_seconds}


def normalisation_stats(feats: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std over every frame of every training window (float64 sums: pre-Fbank
    spans decades). One implementation for the closed-set and the open-set trainers."""
    x = np.concatenate([np.asarray(f, dtype=np.float64).reshape(-1, f.shape[-1]) for f in feats])
    return x.mean(axis=0).astype(np.float32), np.maximum(x.std(axis=0), 1e-8).astype(np.float32)


class Augmenter:
    """Fresh training windows each epoch: a random crop offset, a random gain and light noise
    (``waveform``), and/or a transmission channel (codec or band limit, ``channels``, each recording
    with probability ``channel_p``), and/or noise at an SNR drawn in ``noise_snr_db`` (each
    recording with probability ``noise_p``; SNR as :func:`devrecd.audio.noise.add_noise` defines
    it, after the channel): white, or with ``talkers`` given, babble of 4-6 of them half the time.
    Applied to the waveform and passed through the one frontend (so the features stay exact)."""

    def __init__(self, items: Sequence[Item], cfg: Config, hop_seconds: float, *, gain_db: float = 6.0,
                 noise_dbfs: tuple[float, float] = (-70.0, -50.0), device: str = "cpu", waveform: bool = True,
                 channels: Sequence[str] = (), channel_p: float = 0.5, noise_p: float = 0.0,
                 noise_snr_db: tuple[float, float] = (5.0, 35.0), talkers: Sequence[np.ndarray] = ()) -> None:
        from devrecd.audio import read_evidence
        from devrecd.audio.channel import get_channel

        self.cfg, self.hop, self.device = cfg, hop_seconds, device
        self.gain_db, self.noise_dbfs = gain_db, noise_dbfs
        self.waveform = waveform
        self.channels = [get_channel(n) for n in channels]
        self.channel_p = channel_p
        self.noise_p, self.noise_snr_db, self.talkers = noise_p, noise_snr_db, list(talkers)
        self.waves = [read_evidence(it.path, cfg.frontend.sample_rate, cfg.audio) for it in items]
        self._through: dict[tuple[int, str], np.ndarray] = {}  # a codec round trip is deterministic: once each

    def _channel_samples(self, i: int, rng: np.random.Generator) -> np.ndarray:
        rec = self.waves[i]
        if not self.channels or rng.random() >= self.channel_p:
            return rec.samples
        ch = self.channels[int(rng.integers(len(self.channels)))]
        key = (i, ch.key)
        if key not in self._through:
            from devrecd.audio.transmit import apply_channel

            self._through[key] = apply_channel(ch, rec.samples, rec.sample_rate)
        return self._through[key]

    def _noisy(self, samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``samples`` with noise at a random SNR, with probability ``noise_p`` (no draw when 0: the
        other augmentations' random stream is unchanged; nor for the kind without talkers)."""
        if self.noise_p <= 0 or rng.random() >= self.noise_p:
            return samples
        from devrecd.audio.noise import add_drawn_noise

        snr = float(rng.uniform(*self.noise_snr_db))
        babble = self.talkers if self.talkers and rng.random() < 0.5 else ()
        return add_drawn_noise(samples, self.cfg.frontend.sample_rate, snr, rng, talkers=babble)

    def epoch_features(self, seed: int, epoch: int) -> list[np.ndarray]:
        """Per-recording (n, 128, 73) raw features for ``epoch`` (same seed and epoch, same features)."""
        from devrecd.features import extract

        rng = np.random.default_rng([seed, epoch, 0xA06])
        hop = hop_samples(self.hop, self.cfg.frontend.sample_rate)
        out = []
        for i, rec in enumerate(self.waves):
            samples = self._noisy(self._channel_samples(i, rng), rng)
            if not self.waveform:
                out.append(extract(np.array(clips_for(replace(rec, samples=samples), self.cfg.frontend, self.hop),
                                            dtype=np.float32), frontend_for(self.cfg.frontend), device=self.device))
                continue
            room = len(samples) - self.cfg.frontend.clip_samples + 1
            offset = int(rng.integers(0, max(1, min(hop, room))))
            clips = np.array(clips_for(replace(rec, samples=samples[offset:]), self.cfg.frontend, self.hop),
                             dtype=np.float32)
            gains = 10.0 ** (rng.uniform(-self.gain_db, self.gain_db, (len(clips), 1)) / 20.0)
            noise = 10.0 ** (rng.uniform(*self.noise_dbfs, (len(clips), 1)) / 20.0)
            clips = clips * gains + noise * rng.standard_normal(clips.shape)
            out.append(extract(np.clip(clips, -1.0, 1.0).astype(np.float32), frontend_for(self.cfg.frontend),
                               device=self.device))
        return out
