"""``devrecd export``: contract, inline weights, dynamic batch, parity, FP16 variant, TensorRT-parsable ops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from devrecd.audio import sha256_file
from devrecd.cli import app
from devrecd.config import load_config
from devrecd.contract import INPUT_NAME, OUTPUT_NAME, Contract, load_for_onnx
from devrecd.errors import ArtifactError
from devrecd.backends.onnxrt import ort_session
from devrecd.export import export_checkpoint, export_graph, fp16_path_for, onnx_ops, parity_features_path
from devrecd.model.serving import inference_graph
from devrecd.features import FEATURE_DIM, FrontendConfig

# ---------------------------------------------------------------------------------------------------
# TensorRT's ONNX operator support, transcribed from onnx-tensorrt docs/operators.md (the TensorRT 10.x
# branch, "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24"; TensorRT
# 10.0's page says opset 9 to 20). Only operators listed "Y" with FP32/FP16 support, and only those a
# classifier like ours could plausibly produce. Absent on purpose: DFT (N), STFT (FP32 only, and we
# compute features outside the graph anyway), SequenceXxx (N), Hardmax before 10.x.
TENSORRT_ONNX_OPS = frozenset({
    "Abs", "Add", "ArgMax", "AveragePool", "BatchNormalization", "Cast", "CastLike", "Ceil", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "CumSum", "Div", "Dropout", "Einsum", "Elu", "Equal",
    "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm",
    "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GRU", "HardSigmoid", "Identity", "If",
    "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LSTM", "MatMul",
    "Max", "MaxPool", "Mean", "Min", "Mod", "Mul", "Neg", "Not", "Pad", "Pow", "PRelu", "Range", "Reciprocal",
    "ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape",
    "RNN", "Shape", "Sigmoid", "Sign", "Slice", "Softmax", "Softplus", "Split", "Sqrt", "Squeeze", "Sub", "Sum",
    "Tanh", "Tile", "Transpose", "Unsqueeze", "Where",
})
TENSORRT_OPSETS = range(9, 21)  # TensorRT 10.0 (the oldest 10.x) parses opsets 9..20


def _onnx(path):
    import onnx

    return onnx.load(str(path))


def test_export_writes_contract_and_inline_weights(exported_model, trained_checkpoint: Path) -> None:
    onnx_path, contract_path, ckpt_path = exported_model
    from devrecd.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(trained_checkpoint)
    contract = load_for_onnx(onnx_path)  # sha256 + size verified
    assert contract_path == onnx_path.with_suffix(".json") and contract_path.is_file()
    assert not list(onnx_path.parent.glob("*.data")), "weights must be inline"
    assert contract.onnx_sha256 == sha256_file(onnx_path)
    assert contract.checkpoint_sha256 == sha256_file(ckpt_path)
    assert contract.labels == tuple(ckpt.labels) and len(contract.labels) == 15
    assert contract.frontend == ckpt.frontend and contract.frontend_fingerprint == ckpt.frontend.fingerprint()
    assert contract.input.name == INPUT_NAME and contract.input.shape == ("batch", 128, FEATURE_DIM)
    assert contract.output.name == OUTPUT_NAME and contract.output.shape == ("batch", 15)
    assert contract.precision == "fp32" and contract.opset in TENSORRT_OPSETS
    assert {"torch", "onnx", "onnxruntime", "devrecd"} <= set(contract.versions)
    parity = contract.parity
    assert parity["passed"] and parity["n_clips"] >= 15 and parity["max_abs_diff"] <= parity["tolerance"] == 1e-4
    assert "ccnu_mobile_sample" in parity["source"]
    assert np.load(parity_features_path(onnx_path)).shape == (parity["n_clips"], 128, FEATURE_DIM)
    # The graph itself: fixed names, one dynamic batch axis named "batch", float32 in and out.
    model = _onnx(onnx_path)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 128, FEATURE_DIM]
    assert out.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == 1  # FLOAT


def test_onnx_runtime_matches_the_torch_checkpoint_on_ccnu(exported_model, ccnu_dir: Path) -> None:
    """Done-when: same labels and scores (within tolerance) as the checkpoint, on recordings parity never saw."""
    from devrecd.backends.onnxrt import OnnxRuntimeBackend
    from devrecd.backends.torch_backend import TorchBackend
    from devrecd.stages import features_for_file

    onnx_path, _, ckpt_path = exported_model
    cfg = load_config(None, env={})
    ort_b, torch_b = OnnxRuntimeBackend(onnx_path, threads=1), TorchBackend(ckpt_path)
    import csv

    with open(ccnu_dir / "manifest.csv", newline="") as fh:
        files = [ccnu_dir / r["path"] for r in csv.DictReader(fh) if r["segment"] == "5"]
    feats = np.concatenate([features_for_file(f, cfg)[1] for f in files])
    expected, got = torch_b.infer(feats), ort_b.infer(feats)
    assert got.shape == (len(feats), 15) and np.allclose(got.sum(-1), 1.0, atol=1e-5)
    assert np.max(np.abs(got - expected)) < 1e-4
    margin = np.sort(expected, -1)[:, -1] - np.sort(expected, -1)[:, -2]
    decided = margin > 1e-4  # a near-tie may legitimately flip on float rounding
    assert decided.sum() >= len(feats) // 2
    assert np.array_equal(got.argmax(-1)[decided], expected.argmax(-1)[decided])
    assert ort_b.labels == torch_b.labels


def test_dynamic_batch_axis_gives_identical_rows(exported_model) -> None:
    onnx_path, contract_path, _ = exported_model
    feats = np.load(parity_features_path(onnx_path))
    session = ort_session(onnx_path, threads=1)
    whole = session.run(None, {INPUT_NAME: feats})[0]
    big = np.concatenate([feats] * (64 // len(feats) + 1))[:64]
    for batch in (feats[:1], feats[:3], big):
        out = session.run(None, {INPUT_NAME: batch})[0]
        ref = whole[np.arange(len(batch)) % len(feats)]
        assert out.shape == (len(batch), 15) and np.max(np.abs(out - ref)) < 1e-5


def test_graph_uses_only_operators_tensorrt_parses(exported_model) -> None:
    onnx_path = exported_model.onnx
    ops = onnx_ops(onnx_path)
    assert set(ops) <= TENSORRT_ONNX_OPS, f"not in TensorRT's ONNX list: {sorted(set(ops) - TENSORRT_ONNX_OPS)}"
    assert ops["LSTM"] == 1 and ops["Conv"] >= 256  # BiLSTM as one op; ConvLSTMs unrolled over 128 steps
    model = _onnx(onnx_path)
    assert all(o.domain in ("", "ai.onnx") and o.version in TENSORRT_OPSETS for o in model.opset_import)
    inits = {i.name for i in model.graph.initializer}
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "LSTM":
            # onnx-tensorrt: same activations both directions, input_forget = 0, layout = 0
            assert attrs["direction"].s == b"bidirectional"
            acts = [a.decode() for a in attrs["activations"].strings] if "activations" in attrs else []
            assert acts[: len(acts) // 2] == acts[len(acts) // 2:]
            assert attrs.get("input_forget") is None or attrs["input_forget"].i == 0
            assert attrs.get("layout") is None or attrs["layout"].i == 0
        if node.op_type == "Conv":  # TensorRT wants constant conv weights
            assert node.input[1] in inits | constants


def test_export_fails_on_parity_and_leaves_no_file(tmp_path: Path) -> None:
    """A graph that disagrees with its reference is refused, and no NAME.onnx/NAME.json is left behind."""
    import torch

    rng = np.random.default_rng(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(128 * FEATURE_DIM, 3))
    mean, std = np.zeros(FEATURE_DIM, np.float32), np.ones(FEATURE_DIM, np.float32)
    graph = inference_graph(net, mean, std)
    other = inference_graph(net, mean + 1.0, std)  # a different normalisation: different outputs
    feats = rng.normal(size=(6, 128, FEATURE_DIM)).astype(np.float32)
    common = dict(labels=["a", "b", "c"], frontend=FrontendConfig(), features=feats, feature_source="test",
                  arch="linear", checkpoint_sha256="0" * 64)
    out = tmp_path / "x.onnx"
    with pytest.raises(ArtifactError) as err:
        export_graph(graph, out, reference=other, **common)
    assert err.value.reason == "parity" and "max abs difference" in str(err.value)
    assert list(tmp_path.iterdir()) == []
    # ... while the same graph against itself passes and writes the files
    result = export_graph(graph, out, **common)
    assert result.contract.parity["passed"] and out.is_file() and out.with_suffix(".json").is_file()
    assert result.contract.ort_file() == "x.ort" and (tmp_path / "x.ort").is_file()
    assert not [p.name for p in tmp_path.iterdir() if "partial" in p.name]


def test_fp16_variant_keeps_input_and_normalisation_fp32(trained_checkpoint: Path, ccnu_dir: Path,
                                                          tmp_path: Path) -> None:
    import onnx

    cfg = load_config(None, env={})
    audio = sorted(ccnu_dir.glob("*_4.wav"))[:4]
    out = tmp_path / "paper.onnx"
    steps: list[tuple[int, int, str]] = []
    results = export_checkpoint(trained_checkpoint, out, cfg=cfg, parity_audio=audio, fp16=True,
                                on_progress=lambda *step: steps.append(step))
    assert [r.onnx_path for r in results] == [out, fp16_path_for(out)]
    # Progress: one step per parity recording, then one per graph exported; the total known from the start.
    assert steps == [(i + 1, 6, f"parity audio {p.name}") for i, p in enumerate(audio)] + [
        (5, 6, "exported paper.onnx"), (6, 6, "exported paper-fp16.onnx")]
    c16 = Contract.load(fp16_path_for(out).with_suffix(".json"))
    assert c16.precision == "fp16" and c16.parity["passed"] and c16.parity["tolerance"] == 2e-2
    assert c16.input.dtype == "float32" and c16.output.dtype == "float32"
    model = _onnx(fp16_path_for(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # The input is consumed only by FP32 normalisation (Sub, Mul) and the first Cast goes to FP16 after it.
    consumers = [n.op_type for n in model.graph.node if INPUT_NAME in n.input]
    assert consumers == ["Sub"]
    casts = [n for n in model.graph.node if n.op_type == "Cast"]
    to16 = [n for n in casts if any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)]
    assert to16, "the FP16 graph must cast to FP16 after normalisation"
    weights16 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(weights16) > 10
    # FP16 vs the FP32 export on the same real features: close, same decisions where not a near tie.
    feats = np.load(parity_features_path(out))
    p32 = ort_session(out).run(None, {INPUT_NAME: feats})[0]
    p16 = ort_session(fp16_path_for(out)).run(None, {INPUT_NAME: feats})[0]
    assert np.max(np.abs(p16 - p32)) < 2e-2


def test_cli_export_refuses_a_bad_checkpoint(tmp_path: Path, ccnu_dir: Path) -> None:
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    audio = next(iter(sorted(ccnu_dir.glob("*_4.wav"))))
    result = CliRunner().invoke(app, ["export", str(bad), "--out", str(tmp_path / "m.onnx"), "--parity-audio", str(audio)])
    assert result.exit_code == 1 and "error:" in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_contract_is_plain_json_an_examiner_can_read(exported_model) -> None:
    doc = json.loads(exported_model.contract.read_text())
    assert doc["schema"] == "devrecd.contract/1" and doc["onnx_file"] == "paper.onnx"
    assert doc["frontend"]["sample_rate"] == 32000 and len(doc["labels"]) == 15


def test_cli_export_summary_names_the_file_onnxruntime_serves(exported_model) -> None:
    """`devrecd export` says what it wrote: the .onnx, its parity, the .ort that the onnxruntime
    backend serves (with its own check against the .onnx) and the contract."""
    c = Contract.load(exported_model.contract)
    lines = exported_model.output.splitlines()
    assert lines[0].startswith(f"{exported_model.onnx}  (fp32, 15 labels, sha256 {c.onnx_sha256[:12]}")
    assert lines[1].startswith("  parity vs torch: max abs diff")
    assert lines[2] == (f"  served by onnxruntime: paper.ort (ORT format, sha256 {c.ort['sha256'][:12]}; "
                        f"max abs diff vs the .onnx {c.ort['parity_max_abs_diff']:.2e})")
    assert lines[3] == f"  contract: {exported_model.contract}"
    # The session's checkpoint was made by hand, not by `devrecd train`: it records no SNR range.
    assert c.validated_snr_db is None and lines[4].startswith("  validated SNR range: not recorded")
