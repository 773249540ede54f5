"""``devrecd export-embedder`` and the ONNX Runtime embedder: a registry enrolled with the torch
checkpoint is served from the export (no torch), with the same verdicts, on real CCNU phones.

The network is the session's small ``asp`` embedder (trained on segments 1-2 of the first 8 phones);
the export is parity-checked on segment 4 of three phones, registries enrol three phones the network
never saw (segments 1-2) and are questioned with segment 5.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from devrecd.audio import sha256_file
from devrecd.cli import app
from devrecd.config import load_config
from devrecd.errors import ArtifactError, ConfigError

runner = CliRunner()


@pytest.fixture(scope="module")
def phones(ccnu_dir: Path) -> dict[str, dict[int, Path]]:
    """phone -> segment -> recording."""
    from tests.test_openset_fusion import _by_phone

    return _by_phone(ccnu_dir)


@pytest.fixture(scope="module")
def embedder_export(asp_embedder_checkpoint: Path, phones, tmp_path_factory) -> tuple[Path, str]:
    """`devrecd export-embedder` (the real CLI) of the session's asp embedder; (NAME.onnx, CLI output)."""
    out = tmp_path_factory.mktemp("embexport") / "asp.onnx"
    args = ["export-embedder", str(asp_embedder_checkpoint), "--out", str(out)]
    for name in sorted(phones)[:3]:
        args += ["--parity-audio", str(phones[name][4])]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def embedder_registry(asp_embedder_checkpoint: Path, phones, tmp_path_factory) -> tuple[Path, list[str]]:
    """Three phones the network never saw, enrolled with the CHECKPOINT (`--scorer embedder --model RUN`)."""
    reg = tmp_path_factory.mktemp("embreg") / "registry.json"
    enrolled = sorted(phones)[8:11]
    for name in enrolled:
        result = runner.invoke(app, ["enroll", "--registry", str(reg), "--profile", name, "--scorer", "embedder",
                                     "--model", str(asp_embedder_checkpoint), str(phones[name][1]), str(phones[name][2])])
        assert result.exit_code == 0, result.output
    return reg, enrolled


def _questioned(phones, enrolled: list[str]) -> list[Path]:
    """Segment 5 of the enrolled phones and of one phone that is not enrolled (nor seen in training)."""
    return [phones[n][5] for n in enrolled] + [phones[sorted(phones)[11]][5]]


def test_export_embedder_writes_the_checkpoints_network_with_its_fingerprint(
        embedder_export, asp_embedder_checkpoint, phones) -> None:
    """The export's contract carries the torch embedder's identity; ONNX Runtime gives torch's
    embeddings on real windows it was not parity-checked on, in bounded slices."""
    from devrecd.audio import sha256_file
    from devrecd.contract import EMBEDDING_NAME, EmbedderContract
    from devrecd.openset.embedder import EMBED_BATCH, Embedder, OnnxEmbedder, load_embedder

    onnx, output = embedder_export
    assert sorted(p.name for p in onnx.parent.iterdir()) == ["asp.json", "asp.onnx"]  # no partial file left
    torch_emb = Embedder.load(asp_embedder_checkpoint)
    contract = EmbedderContract.load(onnx.with_suffix(".json"))
    assert contract.kind == "embedder" and contract.fingerprint == torch_emb.fingerprint
    assert (contract.arch, contract.dim, contract.labels) == ("asp", torch_emb.dim, torch_emb.labels)
    assert contract.frontend == torch_emb.frontend and contract.output.name == EMBEDDING_NAME
    assert contract.onnx_sha256 == sha256_file(onnx) and contract.onnx_bytes == onnx.stat().st_size
    assert contract.checkpoint_sha256 == sha256_file(asp_embedder_checkpoint / "best.pt")
    p = contract.parity
    assert p["passed"] and p["n_clips"] >= 15 and p["max_rel_diff"] <= p["tolerance"] == 1e-4
    assert p["min_cosine"] > 0.9999 and "ccnu_mobile_sample" in p["source"]
    assert f"fingerprint {torch_emb.fingerprint[:12]}" in output and "parity vs torch" in output

    served = load_embedder(onnx)
    assert isinstance(served, OnnxEmbedder) and isinstance(load_embedder(asp_embedder_checkpoint), Embedder)
    want, got = torch_emb.describe(), served.describe()
    served_file = {"source": str(onnx.resolve()), "onnx_sha256": contract.onnx_sha256,
                   "checkpoint_sha256": contract.checkpoint_sha256}  # the export adds the served file's identity
    assert {k: v for k, v in got.items() if k not in served_file} == {k: v for k, v in want.items() if k != "source"}
    assert {k: got[k] for k in served_file} == served_file
    cfg = load_config(None, env={})
    for name in sorted(phones)[8:12]:  # phones and a segment the parity check never saw
        _, emb = served.embed_file(phones[name][5], cfg, hop_seconds=0.25)
        _, ref = torch_emb.embed_file(phones[name][5], cfg, hop_seconds=0.25)
        assert emb.shape == ref.shape == (len(ref), torch_emb.dim) and len(ref) > 20 and emb.dtype == np.float32
        rel = np.abs(emb - ref).max(axis=1) / np.linalg.norm(ref, axis=1)
        assert rel.max() <= 1e-4, (name, rel.max())
    # more windows than one slice: the same embeddings as one window at a time
    from devrecd.stages import features_for_file

    x = np.concatenate([features_for_file(phones[n][5], cfg, hop_seconds=0.25)[1] for n in sorted(phones)[8:12]])
    assert len(x) > EMBED_BATCH
    np.testing.assert_allclose(served.embed_features(x), np.concatenate([served.embed_features(x[i:i + 1])
                                                                         for i in range(len(x))]), rtol=0, atol=1e-5)


def test_a_parity_failure_leaves_no_file(asp_embedder_checkpoint, phones, tmp_path) -> None:
    """A graph whose embeddings are not the torch embedder's is refused, and nothing is written."""
    import torch

    from devrecd.export import export_embedding_graph, parity_features
    from devrecd.model.checkpoint import load_checkpoint
    from devrecd.model.serving import embedding_graph
    from devrecd.openset.embedder import Embedder

    ckpt = load_checkpoint(asp_embedder_checkpoint)
    embedder = Embedder.from_checkpoint(ckpt)
    other = ckpt.build()
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.01)  # a network that is not the one the registries were enrolled with
    feats = parity_features([phones[sorted(phones)[0]][4]], ckpt.frontend, load_config(None, env={}), max_clips=8)
    out = tmp_path / "x.onnx"
    with pytest.raises(ArtifactError) as err:
        export_embedding_graph(embedder, out, features=feats, feature_source="test", checkpoint_sha256="0" * 64,
                               graph=embedding_graph(other, ckpt.norm_mean, ckpt.norm_std))
    assert err.value.reason == "parity" and "of their norm" in str(err.value) and "not written" in str(err.value)
    assert list(tmp_path.iterdir()) == []
    # a tolerance no float computation meets fails the same way through the command
    result = runner.invoke(app, ["export-embedder", str(asp_embedder_checkpoint), "--out", str(out),
                                 "--parity-audio", str(phones[sorted(phones)[0]][4]), "--tolerance", "1e-12"])
    assert result.exit_code == 1 and "parity check failed" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_a_tampered_truncated_or_contractless_export_is_refused(embedder_export, tmp_path) -> None:
    from devrecd.openset.embedder import load_embedder

    onnx, _ = embedder_export
    copy = tmp_path / onnx.name
    shutil.copy(onnx, copy)
    shutil.copy(onnx.with_suffix(".json"), copy.with_suffix(".json"))
    load_embedder(copy)  # the intact copy loads
    blob = bytearray(copy.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    copy.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="not the one its contract describes") as err:
        load_embedder(copy)
    assert err.value.reason == "onnx_mismatch"
    copy.write_bytes(onnx.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="truncated") as err:
        load_embedder(copy)
    assert err.value.reason == "onnx_truncated"
    shutil.copy(onnx, copy)
    doc = json.loads(onnx.with_suffix(".json").read_text())
    for edit, message in ((dict(dim=doc["dim"] + 1), "output is"), (dict(fingerprint="abc"), "fingerprint missing"),
                          (dict(kind="vocoder"), "of unknown kind 'vocoder'")):
        copy.with_suffix(".json").write_text(json.dumps({**doc, **edit}))
        with pytest.raises(ArtifactError, match=message):
            load_embedder(copy)
    copy.with_suffix(".json").unlink()
    with pytest.raises(ArtifactError, match="contract not found") as err:
        load_embedder(copy)
    assert err.value.reason == "contract_missing"


def test_an_embedder_export_and_a_classifier_export_are_never_taken_for_each_other(
        embedder_export, exported_model, phones, tmp_path) -> None:
    from devrecd.backends.onnxrt import OnnxRuntimeBackend
    from devrecd.openset.embedder import load_embedder

    onnx, _ = embedder_export
    with pytest.raises(ArtifactError, match="classifier export .* an embedder export is needed here") as err:
        load_embedder(exported_model)
    assert err.value.reason == "contract_kind"
    with pytest.raises(ArtifactError, match="embedder export .* a classifier export is needed here") as err:
        OnnxRuntimeBackend(onnx)
    assert err.value.reason == "contract_kind"
    # from the command line: identify's classifier --model, and the open-set commands' network --model
    path = phones[sorted(phones)[0]][5]
    result = runner.invoke(app, ["identify", str(path), "--model", str(onnx)])
    assert result.exit_code == 1 and "a classifier export is needed here" in result.output, result.output
    reg = tmp_path / "reg.json"
    result = runner.invoke(app, ["enroll", str(path), "--profile", "p", "--registry", str(reg),
                                 "--model", str(exported_model)])
    assert result.exit_code == 2 and "it is a classifier export" in result.output, result.output
    assert result.output.count("\n") == 1 and not reg.exists()


def test_a_registry_enrolled_with_the_checkpoint_is_served_from_the_export(
        embedder_registry, embedder_export, phones) -> None:
    """identify with registry.embedder_model = the export: the checkpoint's verdicts and scores."""
    from devrecd.pipeline.identify import identify_files

    reg, enrolled = embedder_registry
    onnx, _ = embedder_export
    questioned = _questioned(phones, enrolled)
    by_torch = identify_files(load_config(None, env={}, overrides={"registry.path": str(reg)}), questioned)
    by_onnx = identify_files(load_config(None, env={}, overrides={"registry.path": str(reg),
                                                                  "registry.embedder_model": str(onnx)}), questioned)
    for t, o in zip(by_torch, by_onnx):
        assert o["outcome"] == t["outcome"] == "judged", (o, t)
        assert o["scorer"]["kind"] == "embedder" and o["scorer"]["source"] == str(onnx.resolve())
        assert o["scorer"]["onnx_sha256"] == sha256_file(onnx)  # the served file's identity in every verdict
        assert o["scorer"]["fingerprint"] == t["scorer"]["fingerprint"] == json.loads(reg.read_text())["embedder"]["fingerprint"]
        assert (o["device"], o["candidate"]) == (t["device"], t["candidate"])
        assert o["score"] == pytest.approx(t["score"], abs=1e-4)
        assert [c["device"] for c in o["top_k"]] == [c["device"] for c in t["top_k"]]
        assert [c["score"] for c in o["top_k"]] == pytest.approx([c["score"] for c in t["top_k"]], abs=1e-4)
    assert sum(r["candidate"] == n for r, n in zip(by_onnx, enrolled)) >= 2  # it does tell the phones apart


def test_the_export_of_another_network_is_refused_by_the_registry(embedder_registry, embedder_export,
                                                                   tmp_path) -> None:
    """The registry's fingerprint check holds for the export: a registry of another network refuses it."""
    from devrecd.openset.registry import RegistryError
    from devrecd.openset.workflow import RegistryJudge

    reg, _ = embedder_registry
    onnx, _ = embedder_export
    doc = json.loads(reg.read_text())
    doc["embedder"]["fingerprint"] = "f" * 64  # as if enrolled with another checkpoint
    from devrecd.openset.registry import content_hash

    doc["content_sha256"] = content_hash(doc)  # made so on purpose: not an edit the content hash should catch
    for arrays in reg.parent.glob(f"{reg.stem}.*.npz"):  # the registry's arrays, named in its JSON
        shutil.copy(arrays, tmp_path / arrays.name)
    other = tmp_path / reg.name
    other.write_text(json.dumps(doc))
    cfg = load_config(None, env={}, overrides={"registry.path": str(other), "registry.embedder_model": str(onnx)})
    with pytest.raises(RegistryError, match="Embeddings of different models cannot be compared") as err:
        RegistryJudge(cfg)
    assert err.value.reason == "model_mismatch"
    # The network came from the configuration, which applies to every registry: the error says so.
    assert f"registry.embedder_model = {str(onnx)!r}" in str(err.value) and "pass --model" in str(err.value)


def test_an_export_whose_contract_declares_another_frontend_is_refused_by_the_registry(
        embedder_registry, embedder_export, tmp_path) -> None:
    """The contract is what declares an export's frontend: one edited to another frontend (its
    fingerprint field recomputed, the .onnx untouched, so sha256 and size still hold) would make the
    pipeline compute other features for the same profiles. The registry refuses it."""
    from dataclasses import replace

    from devrecd.contract import EmbedderContract, contract_path_for
    from devrecd.openset.registry import RegistryError
    from devrecd.openset.workflow import RegistryJudge

    reg, _ = embedder_registry
    onnx, _ = embedder_export
    shutil.copy(onnx, tmp_path / onnx.name)
    contract = EmbedderContract.load(contract_path_for(onnx))
    other = replace(contract.frontend, preemphasis=0.5)
    replace(contract, frontend=other, frontend_fingerprint=other.fingerprint()).save(contract_path_for(tmp_path / onnx.name))
    cfg = load_config(None, env={}, overrides={"registry.path": str(reg),
                                               "registry.embedder_model": str(tmp_path / onnx.name)})
    with pytest.raises(RegistryError, match="another frontend") as err:
        RegistryJudge(cfg, adopt_frontend=True)  # open set only: the pipeline would compute the scorer's frontend
    assert err.value.reason == "model_mismatch"


def test_enrol_and_compare_with_the_export_from_the_command_line(embedder_registry, embedder_export, phones,
                                                                 tmp_path) -> None:
    """--model takes the embedder export: a new registry enrolled with it is the checkpoint's registry
    (same fingerprint), and compare scores like the checkpoint."""
    reg, enrolled = embedder_registry
    onnx, _ = embedder_export
    name = enrolled[0]
    new = tmp_path / "onnx-registry.json"
    result = runner.invoke(app, ["enroll", "--registry", str(new), "--profile", name, "--model", str(onnx),
                                 str(phones[name][1]), str(phones[name][2])])
    assert result.exit_code == 0, result.output
    made, want = json.loads(new.read_text()), json.loads(reg.read_text())
    assert made["embedder"]["fingerprint"] == want["embedder"]["fingerprint"]
    assert made["embedder"]["source"] == str(onnx.resolve())

    def compare(*extra: str) -> float:
        res = runner.invoke(app, ["compare", str(phones[name][5]), "--registry", str(reg), "--reference-device", name,
                                  "--format", "json", *extra])
        assert res.exit_code == 0, res.output
        return json.loads([x for x in res.output.splitlines() if x.startswith("{")][0])["score"]

    assert compare("--model", str(onnx)) == pytest.approx(compare(), abs=1e-4)

    # calibrate (on a copy of the registry) with the export: the checkpoint's trials and threshold
    from tests.test_openset_fusion import _dataset

    held = _dataset(tmp_path / "held", phones, [*enrolled, sorted(phones)[11]])
    outputs = []
    for model in ([], ["--model", str(onnx)]):
        copy = tmp_path / f"copy{len(outputs)}"
        shutil.copytree(reg.parent, copy)
        res = runner.invoke(app, ["calibrate", str(held), "--registry", str(copy / reg.name), "--split-groups",
                                  "test=3,5", "--format", "json", *model])
        assert res.exit_code == 0, res.output
        outputs.append(json.loads(res.output[res.output.index("{"):])["calibrations"]["clean"])
    by_torch, by_onnx = outputs
    assert (by_onnx["metrics"]["n_target"], by_onnx["metrics"]["n_nontarget"]) == \
        (by_torch["metrics"]["n_target"], by_torch["metrics"]["n_nontarget"]) == (6, 18)
    assert by_onnx["threshold"] == pytest.approx(by_torch["threshold"], abs=1e-4)
    assert by_onnx["metrics"]["eer"] == pytest.approx(by_torch["metrics"]["eer"], abs=1e-9)


def test_identify_serves_an_embedder_registry_without_the_training_stack(
        embedder_registry, embedder_export, phones, tmp_path) -> None:
    """The serving install: torch, scikit-learn, scipy, matplotlib and onnx unimportable, identify
    with an embedder registry and its export gives the verdict of the in-process (torch) run."""
    from tests.test_serving_install import assert_identify_without_training_stack

    reg, enrolled = embedder_registry
    onnx, _ = embedder_export
    assert_identify_without_training_stack(["--registry", str(reg)], phones[enrolled[1]][5], tmp_path,
                                           env={"DEVRECD_REGISTRY__EMBEDDER_MODEL": str(onnx)})


def test_registry_embedder_model_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"registry\.embedder_model: expected str"):
        load_config(None, env={}, overrides={"registry.embedder_model": 3})
    # Not judged by its name: a run directory may be called anything.
    assert load_config(None, env={"DEVRECD_REGISTRY__EMBEDDER_MODEL": "runs/emb.v2"}).registry.embedder_model == "runs/emb.v2"
    assert load_config(None, env={}, overrides={"registry.embedder_model": "export/asp.onnx"}).registry.embedder_model


def test_a_fusion_registry_is_served_from_the_export(asp_embedder_checkpoint, embedder_export, phones,
                                                     tmp_path) -> None:
    """A fusion (network + shipped GSV) trained and enrolled with the checkpoint, identified with
    registry.embedder_model = the export: the same verdicts, fused scores within 1e-4, also where the
    training stack cannot be imported; train-fusion with the export fits the same weights."""
    from devrecd.pipeline.identify import identify_files

    onnx, _ = embedder_export
    names = sorted(phones)
    from tests.test_openset_fusion import _dataset

    dev = _dataset(tmp_path / "dev", phones, names[8:11])
    fusion = tmp_path / "fusion.npz"
    res = runner.invoke(app, ["train-fusion", str(dev), "--model", str(asp_embedder_checkpoint), "--out", str(fusion)])
    assert res.exit_code == 0, res.output
    # train-fusion takes the export too: the same fusion (weights fitted on the same scores)
    from devrecd.openset.scorers import load_fusion

    res = runner.invoke(app, ["train-fusion", str(dev), "--model", str(onnx), "--out", str(tmp_path / "f2.npz")])
    assert res.exit_code == 0, res.output
    (a, _), (b, _) = load_fusion(fusion), load_fusion(tmp_path / "f2.npz")
    assert a.fingerprint == b.fingerprint and b.describe()["parts"][0]["source"] == str(onnx.resolve())
    np.testing.assert_allclose(b.weights, a.weights, rtol=1e-3)
    reg = tmp_path / "registry.json"
    enrolled = names[11:13]
    for p in enrolled:
        res = runner.invoke(app, ["enroll", "--registry", str(reg), "--profile", p, "--fusion", str(fusion),
                                  str(phones[p][1]), str(phones[p][2])])
        assert res.exit_code == 0, res.output
    questioned = [phones[p][5] for p in enrolled] + [phones[names[13]][5]]
    by_torch = identify_files(load_config(None, env={}, overrides={"registry.path": str(reg)}), questioned)
    by_onnx = identify_files(load_config(None, env={}, overrides={"registry.path": str(reg),
                                                                  "registry.embedder_model": str(onnx)}), questioned)
    for t, o in zip(by_torch, by_onnx):
        assert o["scorer"]["kind"] == t["scorer"]["kind"] == "fusion"
        assert str(onnx.resolve()) in o["scorer"]["source"] and str(onnx.resolve()) not in t["scorer"]["source"]
        assert (o["device"], o["candidate"]) == (t["device"], t["candidate"])
        assert o["score"] == pytest.approx(t["score"], abs=1e-4)
    # and on the serving install: the GSV part from the registry's arrays, the network from the export
    from tests.test_serving_install import assert_identify_without_training_stack

    assert_identify_without_training_stack(["--registry", str(reg)], questioned[0], tmp_path,
                                           env={"DEVRECD_REGISTRY__EMBEDDER_MODEL": str(onnx)})


def test_doctor_loads_the_network_of_an_embedder_registry(embedder_registry, embedder_export, tmp_path) -> None:
    """doctor names the network an embedder registry will be served with, and fails when it does not load."""
    reg, _ = embedder_registry
    onnx, _ = embedder_export
    for model, ok, detail in ((str(onnx), True, f"embedder network {onnx.resolve()}"),
                              (str(tmp_path / "gone.onnx"), False, "its embedder network does not load")):
        result = runner.invoke(app, ["doctor", "--format", "json"],
                               env={"DEVRECD_REGISTRY__PATH": str(reg), "DEVRECD_REGISTRY__EMBEDDER_MODEL": model,
                                    "DEVRECD_WATCH__STATE_DIR": str(tmp_path / "state"), "DEVRECD_METRICS__PORT": "0"})
        check = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "registry")
        assert check["ok"] is ok and detail in check["detail"], check
        assert (result.exit_code == 0) is ok, result.output
