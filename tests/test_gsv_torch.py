"""The shipped GSV scorer in torch (devrecd/supervector_torch.py) against the numpy scorer, on real phones.

On the CPU here (torch's CPU device: the same code the GPU runs); the same comparison on a CUDA
device is marked ``gpu`` and also runs through the serving path (RegistryJudge on ``cuda``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from devrecd.config import Config

torch = pytest.importorskip("torch")


def _phones(ccnu_dir: Path) -> dict[str, dict[str, Path]]:
    rows = [r.split(",") for r in (ccnu_dir / "manifest.csv").read_text().splitlines()[1:]]
    by_phone: dict[str, dict[str, Path]] = {}
    for path, device, seg in rows:
        by_phone.setdefault(device.strip('"'), {})[seg] = ccnu_dir / path.strip('"')
    return by_phone


def _parity(ccnu_dir: Path, device: str) -> None:
    from devrecd.audio import read_evidence
    from devrecd.openset.scorers import default_gsv_path, load_gsv
    from devrecd.stages import clips_for, features_for_file
    from devrecd.supervector_torch import TorchGsvScorer

    shipped, _ = load_gsv(default_gsv_path())
    on_torch = TorchGsvScorer(shipped, device)
    assert on_torch.describe() == shipped.describe() and on_torch.fingerprint == shipped.fingerprint
    cfg = replace(Config(), frontend=shipped.frontend)
    by_phone = _phones(ccnu_dir)
    names = sorted(by_phone)
    assert len(names) == 15
    profiles = np.stack([shipped.recording_vector(features_for_file(by_phone[p]["1"], cfg)[1]) for p in names])
    worst = 0.0
    for p in names:
        path = by_phone[p]["4"]
        rec, feats = features_for_file(path, cfg)  # numpy frontend, numpy scorer: the serving path
        want_rec, want_win = shipped.recording_vector(feats), shipped.window_vectors(feats)
        want = shipped.score(want_rec, profiles)[0]
        # the torch path from the samples: frontend, statistics, supervector, NAP, scores on the device
        clips = clips_for(read_evidence(path, cfg.frontend.sample_rate, cfg.audio), cfg.frontend, cfg.audio.hop_seconds)
        on_dev = on_torch.features(clips)
        assert on_dev.device.type == torch.device(device).type
        got_rec, got_win = on_torch.recording_vector(on_dev), on_torch.window_vectors(on_dev)
        got = on_torch.score(got_rec, profiles)[0]
        assert got_win.shape == want_win.shape and got_rec.dtype == np.float64
        assert int(np.argmax(got)) == int(np.argmax(want)), p  # the same verdict
        worst = max(worst, float(np.abs(got - want).max()), float(np.abs(on_torch.score(got_win, profiles)
                                                                           - shipped.score(want_win, profiles)).max()))
        # the same features handed over as numpy: the same arithmetic in float64
        np.testing.assert_allclose(on_torch.recording_vector(feats), want_rec, atol=1e-12)
        np.testing.assert_allclose(on_torch.window_vectors(feats), want_win, atol=1e-12)
    assert worst < 1e-4, worst


def test_torch_gsv_scorer_matches_the_numpy_scorer_on_real_phones(ccnu_dir: Path) -> None:
    _parity(ccnu_dir, "cpu")


def test_gsv_scorer_goes_on_the_gpu_only_for_a_cuda_device() -> None:
    from devrecd.openset.scorers import default_gsv_path, load_gsv
    from devrecd.supervector_torch import TorchGsvScorer, on_device

    shipped, _ = load_gsv(default_gsv_path())
    assert on_device(shipped, "cpu") is shipped
    with pytest.raises(TypeError):
        TorchGsvScorer(object(), "cpu")


@pytest.mark.gpu
def test_torch_gsv_scorer_on_cuda_matches_numpy_and_serves(ccnu_dir: Path, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _parity(ccnu_dir, "cuda")
    from typer.testing import CliRunner

    from devrecd.cli import app
    from devrecd.openset.workflow import RegistryJudge
    from devrecd.stages import features_for_file
    from devrecd.supervector_torch import TorchGsvScorer

    by_phone = _phones(ccnu_dir)
    reg = tmp_path / "registry.json"
    for p in sorted(by_phone)[:2]:
        res = CliRunner().invoke(app, ["enroll", "--registry", str(reg), "--profile", p, str(by_phone[p]["1"])])
        assert res.exit_code == 0, res.output
    cfg = Config().with_overrides({"registry.path": str(reg)})
    on_cpu, on_gpu = RegistryJudge(cfg), RegistryJudge(cfg, device="cuda")
    assert isinstance(on_gpu.scorer, TorchGsvScorer)
    for p in sorted(by_phone)[:3]:
        _, feats = features_for_file(by_phone[p]["4"], cfg)
        a, b = on_cpu.judge(feats), on_gpu.judge(torch.as_tensor(feats, device="cuda"))
        assert a["candidate"] == b["candidate"] and abs(a["score"] - b["score"]) < 1e-4
