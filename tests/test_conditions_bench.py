"""The case-conditions benchmark (``benchmarks/conditions.py``) makes the conditions it says it makes,
on a real CCNU recording: re-quantised level, SNR by its own definition, cut length."""

from __future__ import annotations

import importlib.util
import io
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("conditions_bench", REPO / "benchmarks" / "conditions.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def recording(ccnu_dir: Path):
    x, rate = sf.read(ccnu_dir / "xiaomi8se_4.wav", dtype="float64")
    return x, rate


def _wav(data: bytes) -> tuple[np.ndarray, int, str]:
    info = sf.info(io.BytesIO(data))
    y, rate = sf.read(io.BytesIO(data), dtype="float64")
    return y, rate, info.subtype


def _db(x: np.ndarray) -> float:
    return 10 * math.log10(float(np.mean(x ** 2)))


def test_level_is_requantised_16_bit_at_the_asked_gain(bench, recording):
    x, rate = recording
    data, suffix, _ = bench.render("level-20dB", x, rate, "xiaomi8se_4", None)
    y, r, subtype = _wav(data)
    assert (suffix, r, subtype, len(y)) == (".wav", rate, "PCM_16", len(x))
    assert _db(y) - _db(x) == pytest.approx(-20.0, abs=0.05)
    assert np.array_equal(np.round(y * 32768), y * 32768)  # on the 16-bit grid


def test_level_that_would_clip_is_excluded(bench, recording):
    x, rate = recording
    gain = 1.01 / float(np.max(np.abs(x)))
    with pytest.raises(bench.Excluded):
        bench.render(f"level+{20 * math.log10(gain):.3f}dB", x, rate, "xiaomi8se_4", None)


def test_white_noise_has_the_snr_of_its_definition(bench, recording):
    x, rate = recording
    data, _, info = bench.render("white20dB", x, rate, "xiaomi8se_4", None)
    y, _, _ = _wav(data)
    noise = y - x  # what was added (and the 16-bit rounding, far below it)
    assert bench.snr_db(x, noise, rate) == pytest.approx(20.0, abs=0.1)
    assert info["white_snr_db"] == pytest.approx(20.0, abs=1e-6)
    # the definition: active speech level (not the mean power over silences too) over noise power
    assert bench.active_level(x, rate) >= float(np.mean(x ** 2))


def test_cut_keeps_the_first_seconds_bit_exact(bench, recording):
    x, rate = recording
    data, _, info = bench.render("first3s", x, rate, "xiaomi8se_4", None)
    y, _, _ = _wav(data)
    assert len(y) == 3 * rate and info["seconds"] == 3.0
    assert np.array_equal(y, x[: 3 * rate])
