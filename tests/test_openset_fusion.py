"""The fused scorer from the CLI (`devrecd train-fusion`, `--fusion`/`--scorer fusion`), and every open-set
command serving with the scorer's own frontend, on real CCNU phones.

The network part is the session's small ``asp`` embedder (trained on segments 1-2 of the first 8
phones): the fusion is trained on 4 of the 7 phones it never saw, and enrolled/judged on the other 3.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from devrecd.cli import app
from devrecd.config import load_config
from devrecd.errors import ArtifactError
from devrecd.features import FrontendConfig
from devrecd.openset.protocol import profile_vectors
from devrecd.openset.scorers import GsvScorer, load_fusion, save_gsv
from devrecd.openset.vectors import unit

run = CliRunner().invoke


def _by_phone(ccnu_dir: Path) -> dict[str, dict[int, Path]]:
    with open(ccnu_dir / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, dict[int, Path]] = {}
    for r in rows:
        out.setdefault(r["device"], {})[int(r["segment"])] = ccnu_dir / r["path"]
    return out


def _dataset(folder: Path, phones: dict[str, dict[int, Path]], names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path,device,segment"] + [f'"{path}","{p}",{s}' for p in names for s, path in sorted(phones[p].items())]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def fusion(asp_embedder_checkpoint: Path, ccnu_dir: Path, tmp_path_factory):
    """`devrecd train-fusion` on 4 phones unseen by the network (the shipped GSV scorer as second part)."""
    phones = _by_phone(ccnu_dir)
    unseen = sorted(phones)[8:]
    tmp = tmp_path_factory.mktemp("fusion")
    dev = _dataset(tmp / "dev", phones, unseen[:4])
    out = tmp / "fusion.npz"
    res = run(app, ["train-fusion", str(dev), "--model", str(asp_embedder_checkpoint), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, phones, unseen[4:], tmp, res.output


def test_train_fusion_writes_a_scorer_with_its_development_calibration(fusion, asp_embedder_checkpoint) -> None:
    out, _, _, _, output = fusion
    assert "20 recordings of 4 devices" in output and "note:" not in output  # no device trained the network
    scorer, meta = load_fusion(out)
    assert [p.kind for p in scorer.parts] == ["embedder", "gsv"] and np.isfinite(scorer.weights).all()
    cal = scorer.describe()["dev_calibrations"]["clean"]
    # 4 devices: references = segments 1-2, questioned = 3-5 against every profile; the decision of [registry]
    assert (cal["metrics"]["n_target"], cal["metrics"]["n_nontarget"], cal["decision"]["rule"]) == (12, 36, "bayes")
    assert cal["scorer"]["fingerprint"] == scorer.fingerprint
    assert meta["datasets"][0]["recordings"] == 20 and meta["network_devices_seen"] == []
    # the network part is the checkpoint the file names; another network is refused
    import torch

    other = out.parent / "other.pt"
    blob = torch.load(Path(asp_embedder_checkpoint) / "best.pt", weights_only=True)
    blob["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    torch.save(blob, other)
    with pytest.raises(ArtifactError, match="not the scorers it was trained with"):
        load_fusion(out, model=other)


def test_fusion_enrols_calibrates_compares_and_identifies(fusion) -> None:
    from devrecd.pipeline.identify import identify_files

    out, phones, held, tmp, _ = fusion
    reg = tmp / "case" / "registry.json"
    enrolled, stranger = held[:2], held[2]
    for p in enrolled:
        res = run(app, ["enroll", "--registry", str(reg), "--profile", p, "--fusion", str(out),
                        str(phones[p][1]), str(phones[p][2])])
        assert res.exit_code == 0, res.output
    stored = json.loads(reg.read_text())["embedder"]
    scorer, _ = load_fusion(out)
    assert stored["kind"] == "fusion" and stored["weights"] == pytest.approx(list(scorer.weights))
    assert stored["dev_calibrations"]["clean"]["threshold"] == pytest.approx(scorer.calibrations["clean"]["threshold"])
    res = run(app, ["enroll", "--registry", str(reg), "--profile", "x", "--scorer", "gsv", str(phones[stranger][1])])
    assert res.exit_code == 2 and "was enrolled with scorer 'fusion', not 'gsv'" in res.output  # usage error

    # As recorded (no references brought to a questioned recording's noise: some CCNU recordings are a few
    # dB noisier than their references), so that the fused score can be recomputed from the references below.
    cfg = load_config(None, env={}, overrides={"registry.path": str(reg), "registry.match_conditions": False})
    records = {Path(r["path"]).name: r for r in identify_files(cfg, [phones[enrolled[0]][4], phones[stranger][4]])}
    hit, miss = records[phones[enrolled[0]][4].name], records[phones[stranger][4].name]
    assert hit["scorer"]["kind"] == "fusion" and hit["open_set"]["scorer"] == "fusion"
    assert hit["open_set"]["calibration_source"].startswith("scorer's development calibration")
    assert hit["candidate"] == enrolled[0]
    # the verdict's score is the fused score: weights . (network cosine, GSV cosine) + bias
    from devrecd.openset.workflow import recording_features

    _, feats = recording_features(scorer, phones[enrolled[0]][4], cfg)
    refs = {p: [scorer.recording_vector(recording_features(scorer, phones[p][s], cfg)[1]) for s in (1, 2)]
            for p in enrolled}
    names, prof = profile_vectors(refs)
    parts = scorer.part_scores(scorer.recording_vector(feats), prof)[0]
    assert hit["score"] == pytest.approx(float((parts @ scorer.weights + scorer.bias)[names.index(enrolled[0])]),
                                         abs=1e-4)
    assert miss["candidate"] in enrolled

    res = run(app, ["compare", str(phones[enrolled[0]][4]), "--registry", str(reg), "--reference-device",
                    enrolled[0], "--format", "json"])
    assert res.exit_code == 0, res.output
    record = json.loads([x for x in res.output.splitlines() if x.startswith("{")][0])
    assert record["score"] == pytest.approx(hit["score"], abs=1e-4)

    held_ds = _dataset(tmp / "held", phones, held)
    res = run(app, ["calibrate", str(held_ds), "--registry", str(reg), "--split-groups", "test=3,5"])
    assert res.exit_code == 0, res.output
    assert "4 target / 8 non-target trials" in res.output  # 2 enrolled x 2 + the stranger's 2, x 2 profiles
    assert json.loads(reg.read_text())["calibrations"]["clean"]["metrics"]["n_target"] == 4


def test_scorer_fusion_needs_its_file(tmp_path: Path, ccnu_dir: Path) -> None:
    wav = next(iter(_by_phone(ccnu_dir).values()))[1]
    res = run(app, ["enroll", "--registry", str(tmp_path / "r.json"), "--profile", "a", "--scorer", "fusion", str(wav)])
    assert res.exit_code == 2 and "scorer 'fusion' needs --fusion FILE" in res.output


def test_every_command_serves_with_the_scorers_frontend(ccnu_dir: Path, tmp_path: Path) -> None:
    """A scorer made with 4 s clips, used under a config that says 2 s: enrol, calibrate, compare and
    identify all compute 4 s features (the scorer's), never the configured ones."""
    from devrecd.pipeline.identify import identify_files
    from devrecd.data import FeatureCache
    from devrecd.openset.registry import open_registry
    from devrecd.openset.workflow import score_recordings
    from devrecd.stages import features_for_file

    phones = _by_phone(ccnu_dir)
    names = sorted(phones)[:3]
    cfg2 = load_config(None, env={}, overrides={"train.cache_dir": str(tmp_path / "cache")})
    assert cfg2.frontend.clip_seconds == 2.0
    four = replace(cfg2.frontend, clip_seconds=4.0)
    assert four != cfg2.frontend
    cache = FeatureCache(tmp_path / "cache", four, cfg2.audio)
    train = [(p, cache.features(phones[p][s], 2.0)[0]) for p in names for s in (1, 2, 3)]
    scorer = GsvScorer.train([f for _, f in train], [p for p, _ in train], four, mixtures=4, seed=0)
    gsv = tmp_path / "gsv4.npz"
    save_gsv(gsv, scorer)
    reg_path = tmp_path / "reg.json"
    for p in names[:2]:
        res = run(app, ["enroll", "--registry", str(reg_path), "--profile", p, "--gsv", str(gsv),
                        str(phones[p][1]), str(phones[p][2])])
        assert res.exit_code == 0, res.output
    reg = open_registry(reg_path)
    assert FrontendConfig(**reg.embedder["frontend"]) == four
    cfg4 = replace(cfg2, frontend=four)

    def vec(path: Path, cfg) -> np.ndarray:
        return scorer.recording_vector(features_for_file(path, cfg)[1])

    # enrol: each reference's windows are 4 s clips (2 s hop), its vector the 4 s one
    ref = reg.profiles[names[0]].references[0]
    assert ref.windows == len(features_for_file(phones[names[0]][1], cfg4)[1])
    assert ref.windows != len(features_for_file(phones[names[0]][1], cfg2)[1])
    expected = unit(unit(np.stack([vec(phones[names[0]][s], cfg4) for s in (1, 2)])).mean(axis=0))
    np.testing.assert_allclose(reg.profiles[names[0]].mean, expected, atol=1e-6)
    # calibrate's trials, identify's and compare's scores: 4 s features
    q = phones[names[0]][4]
    by4 = float(scorer.score(vec(q, cfg4), expected)[0, 0])
    by2 = float(scorer.score(vec(q, cfg2), expected)[0, 0])
    assert abs(by4 - by2) > 1e-3
    trials = score_recordings(reg, scorer, [(str(q), names[0])], cfg2)
    assert trials.scores[0, trials.profiles.index(names[0])] == pytest.approx(by4, abs=1e-6)
    record = identify_files(replace(cfg2, registry=replace(cfg2.registry, path=str(reg_path))), [q])[0]
    assert record["candidate"] == names[0] and record["score"] == pytest.approx(by4, abs=1e-4)
    res = run(app, ["compare", str(q), "--registry", str(reg_path), "--reference-device", names[0], "--format", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads([x for x in res.output.splitlines() if x.startswith("{")][0])
    assert out["score"] == pytest.approx(by4, abs=1e-4)


def test_a_judge_beside_a_closed_set_model_refuses_another_frontend_for_every_kind(
        asp_embedder_checkpoint: Path, ccnu_dir: Path, tmp_path: Path) -> None:
    """With a closed-set model the pipeline computes the model's frontend; a registry scorer of another
    frontend (network embedders included) is refused rather than fed features it was not made for."""
    from devrecd.openset.registry import RegistryError
    from devrecd.openset.workflow import RegistryJudge

    phones = _by_phone(ccnu_dir)
    name = sorted(phones)[9]
    reg = tmp_path / "emb.json"
    res = run(app, ["enroll", "--registry", str(reg), "--profile", name, "--model", str(asp_embedder_checkpoint),
                    str(phones[name][1])])
    assert res.exit_code == 0, res.output
    cfg = load_config(None, env={}, overrides={"registry.path": str(reg), "frontend.clip_seconds": 4.0})
    with pytest.raises(RegistryError, match="another frontend") as err:
        RegistryJudge(cfg)
    assert err.value.reason == "frontend_mismatch"
    served = RegistryJudge(cfg, adopt_frontend=True)  # open set only: the scorer's own frontend
    assert served.frontend.clip_seconds == 2.0 and served.scorer.kind == "embedder"
