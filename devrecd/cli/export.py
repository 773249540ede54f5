"""``devrecd export``, ``devrecd export-embedder`` and ``devrecd build-engine``."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import enum

import typer

from devrecd.cli.app import ConfigOption, audio_paths, command, load_cli_config, logs_above_bars, progress


class Exporter(str, enum.Enum):
    torchscript = "torchscript"
    dynamo = "dynamo"


def _run_export(export: Callable[..., Any], checkpoint: Path, out: Path, parity_audio: List[Path],
                config: Optional[Path], **options: Any) -> Any:
    """Run an export function of :mod:`devrecd.export` under the CLI's config, parity audio and progress bar."""
    cfg = load_cli_config(config)
    parity = audio_paths(parity_audio, cfg, what="parity audio")
    with _export_progress() as step:
        return export(checkpoint, out, cfg=cfg, parity_audio=parity, on_progress=step, **options)


@contextmanager
def _export_progress() -> Iterator[Callable[[int, int, str], None]]:
    """The ``on_progress`` of an export: a bar opened at the first step (its total known then), log
    lines written above it, closed however the export ends."""
    bar: Any = None

    def step(done: int, total: int, what: str) -> None:
        nonlocal bar
        if bar is None:
            bar = progress(total, "export", unit="step")
        bar.set_postfix_str(what)
        bar.update(1)

    try:
        with logs_above_bars():
            yield step
    finally:
        if bar is not None:
            bar.close()


@command()
def export(
    checkpoint: Path = typer.Argument(..., exists=True, help="RUN_DIR (uses RUN_DIR/best.pt) or a checkpoint .pt."),
    out: Path = typer.Option(..., "--out", "-o", help="export/NAME.onnx; the contract goes to export/NAME.json."),
    parity_audio: List[Path] = typer.Option(..., "--parity-audio", "-a", exists=True,
                                            help="Real recordings (files or folders) for the torch vs ONNX Runtime check."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write NAME-fp16.onnx (FP32 input + normalisation, FP16 network) for TensorRT."),
    opset: int = typer.Option(18, "--opset", min=9, help="ONNX opset (TensorRT 10 parses 9-20)."),
    exporter: Exporter = typer.Option(Exporter.torchscript, "--exporter", case_sensitive=False,
                                      help="torchscript (seconds) or dynamo (torch.export, ~20x slower here)."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", min=0.0, help="Max abs probability difference allowed (default 1e-4)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Export a checkpoint to ONNX with normalisation + softmax folded in; parity-checked on real audio."""
    from devrecd.export import export_checkpoint

    results = _run_export(export_checkpoint, checkpoint, out, parity_audio, config, fp16=fp16, opset=opset,
                          exporter=exporter.value, tolerance=tolerance)
    for result in results:
        c, p = result.contract, result.contract.parity
        typer.echo(f"{result.onnx_path}  ({c.precision}, {len(c.labels)} labels, "
                   f"sha256 {c.onnx_sha256[:12]}, exported in {result.seconds:.1f} s)")
        typer.echo(f"  parity vs torch: max abs diff {p['max_abs_diff']:.2e} <= {p['tolerance']:g}, "
                   f"top-1 agreement {p['top1_agreement']:.1%} on {p['n_clips']} real windows")
        if c.ort:  # what the onnxruntime backend serves: the optimised graph in ORT format
            typer.echo(f"  served by onnxruntime: {c.ort_file()} (ORT format, sha256 {c.ort['sha256'][:12]}; "
                       f"max abs diff vs the .onnx {c.ort['parity_max_abs_diff']:.2e})")
        typer.echo(f"  contract: {result.contract_path}")
        snr = c.validated_snr_db  # what a closed-set verdict is held to (docs/conditions.md)
        origin = f" ({result.snr_origin})" if result.snr_origin else ""
        typer.echo(f"  validated SNR range: {snr[0]:.1f} to {snr[1]:.1f} dB{origin}: noisier "
                   "recordings are judged inconclusive" if snr else
                   "  validated SNR range: not recorded (a checkpoint trained before devrecd recorded it): verdicts "
                   "say so; retrain, or set backend.validated_snr_db")


@command("export-embedder")
def export_embedder_cmd(
    checkpoint: Path = typer.Argument(..., exists=True, help="RUN_DIR (uses RUN_DIR/best.pt) or a checkpoint .pt of a "
                                                              "network with embeddings (`devrecd train-embedder`)."),
    out: Path = typer.Option(..., "--out", "-o", help="export/NAME.onnx; the embedder contract goes to export/NAME.json."),
    parity_audio: List[Path] = typer.Option(..., "--parity-audio", "-a", exists=True,
                                            help="Real recordings (files or folders) for the torch vs ONNX Runtime check."),
    opset: int = typer.Option(18, "--opset", min=9, help="ONNX opset."),
    exporter: Exporter = typer.Option(Exporter.torchscript, "--exporter", case_sensitive=False,
                                      help="torchscript (seconds) or dynamo (torch.export, slower)."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", min=0.0,
                                              help="Max abs embedding difference allowed, relative to the embedding's "
                                                   "norm (default 1e-4)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Export a checkpoint's open-set embedder to ONNX, so that its registries are served without torch."""
    from devrecd.export import export_embedder

    result = _run_export(export_embedder, checkpoint, out, parity_audio, config, opset=opset,
                         exporter=exporter.value, tolerance=tolerance)
    c, p = result.contract, result.contract.parity
    typer.echo(f"{result.onnx_path}  (embedder {c.arch}, dim {c.dim}, fingerprint {c.fingerprint[:12]}, "
               f"sha256 {c.onnx_sha256[:12]}, exported in {result.seconds:.1f} s)")
    typer.echo(f"  parity vs torch: max abs diff / embedding norm {p['max_rel_diff']:.2e} <= {p['tolerance']:g}, "
               f"lowest cosine {p['min_cosine']:.6f} on {p['n_clips']} real windows")
    typer.echo(f"  contract: {result.contract_path}")


@command("build-engine")
def build_engine_cmd(
    onnx: Path = typer.Argument(..., exists=True, dir_okay=False, help="export/NAME.onnx (contract beside it)."),
    fp16: bool = typer.Option(False, "--fp16", help="Build from NAME-fp16.onnx (exported with --fp16)."),
    min_batch: int = typer.Option(1, "--min-batch", help="Smallest batch of the optimisation profile."),
    opt_batch: Optional[int] = typer.Option(None, "--opt-batch", help="Batch the engine is tuned for (default batcher.max_batch)."),
    max_batch: int = typer.Option(256, "--max-batch", help="Largest batch; bigger batches are split at run time."),
    workspace: int = typer.Option(2048, "--workspace", help="Builder workspace limit, MiB."),
    engine_dir: Optional[Path] = typer.Option(None, "--engine-dir", help="Where engines go (backend.engine_dir)."),
    timing_cache: Optional[Path] = typer.Option(None, "--timing-cache", help="Timing cache file (default ENGINE_DIR/timing.cache)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Build a TensorRT engine for this GPU from an export, and check it against ONNX Runtime."""
    from devrecd.backends.tensorrt import Profile
    from devrecd.engine_build import BuildOptions, build_engine

    cfg = load_cli_config(config, {"backend.engine_dir": str(engine_dir) if engine_dir else None})
    opt = opt_batch if opt_batch is not None else min(max(cfg.batcher.max_batch, min_batch), max_batch)
    options = BuildOptions(profile=Profile(min_batch, opt, max_batch), fp16=fp16, workspace_mib=workspace,
                           engine_dir=Path(cfg.backend.engine_dir), timing_cache=timing_cache,
                           device=int(cfg.backend.device.split(":")[1]) if cfg.backend.device.startswith("cuda:") else 0)
    result = build_engine(onnx, options)
    m = result.meta
    typer.echo(f"{result.engine_path}  ({m.precision}, batch {m.profile['min']}/{m.profile['opt']}/{m.profile['max']}, "
               f"{m.gpu['name']} sm{m.gpu['sm']}, TensorRT {m.versions['tensorrt']}, built in {m.build_seconds:.0f} s)")
    typer.echo(f"  vs ONNX Runtime: max abs diff {m.parity['max_abs_diff']:.2e} <= {m.parity['tolerance']:g} "
               f"on {m.parity['n_clips']} real windows")
