"""``devrecd compare`` (same source or not, with a calibrated LR) and ``devrecd report`` (the case report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from devrecd.cli.app import ConfigOption, TextFormat, audio_paths, command, load_cli_config
from devrecd.cli.registry import FusionOption, GsvOption, ModelOption, ScorerKind, ScorerOption
from devrecd.errors import ConfigError


@command()
def compare(
    questioned: List[Path] = typer.Argument(..., help="Questioned recordings (or folders of them)."),
    reference: Optional[List[Path]] = typer.Option(None, "--reference", "-R", help="Reference recording(s) of the device "
                                                   "(or folders); repeat the option. Default: the registry profile "
                                                   "named by --reference-device."),
    reference_device: Optional[str] = typer.Option(None, "--reference-device", "-d",
                                                   help="Name of the reference device (a registry profile when no --reference)."),
    model: Optional[Path] = ModelOption,
    scorer: Optional[ScorerKind] = ScorerOption,
    gsv: Optional[Path] = GsvOption,
    fusion: Optional[Path] = FusionOption,
    registry: Optional[Path] = typer.Option(None, "--registry", "-r", help="Registry JSON (registry.path): its "
                                            "calibration and profiles."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", exists=True, dir_okay=False,
                                               help="lr-calibration.json written by `devrecd calibrate` (default: the registry's)."),
    fmt: TextFormat = typer.Option(TextFormat.table, "--format", case_sensitive=False,
                                   help="table (a line per recording) or json (one JSON record per questioned "
                                        "recording: input for `devrecd report`)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """Same source or different source: score, calibrated and bounded likelihood ratio, verbal equivalent.

    Hp: the questioned recording was made with the reference device; Hd: with another device of
    the relevant population the calibration describes. Without a calibration of this scorer the
    score is reported and no LR is given.
    """
    from devrecd.cli.registry import choose_scorer
    from devrecd.forensic.compare import Comparer, compare as run_compare
    from devrecd.openset.calibration import Calibration, load_calibration
    from devrecd.openset.registry import open_registry
    from devrecd.stages import resolve_device

    cfg = load_cli_config(config, {"registry.path": str(registry) if registry else None})
    reg = open_registry(cfg.registry.path) if cfg.registry.path else None
    # The registry's own scorer when it has profiles (its calibration is of that scorer), else the
    # one asked for: --fusion FILE, --model (network) or the GSV scorer (--gsv FILE, default the shipped one).
    comparer = Comparer(choose_scorer(reg, scorer, model, gsv, resolve_device(cfg.backend.device), fusion,
                                      embedder_model=cfg.registry.embedder_model, threads=cfg.backend.threads), cfg)
    if reference:
        ref_files = audio_paths(reference, cfg, what="reference")
        refs = comparer.references(reference_device or "reference device", ref_files)
    elif reference_device and reg is not None:
        refs = comparer.references_from_profile(reg.get(reference_device), str(reg.path))
    else:
        raise ConfigError("give --reference FILE... or --reference-device NAME of a registry profile")
    # --calibration FILE for every recording; else per recording the calibration of its condition:
    # the registry's case calibration, else the scorer's development one.
    cal: Calibration | None = load_calibration(calibration) if calibration else None
    from devrecd.openset.scoring import CASE, DEVELOPMENT

    dev = {k: Calibration.from_dict(v) for k, v in (comparer.describe().get("dev_calibrations") or {}).items()}
    layers = [(reg.calibrations if reg is not None else {}, CASE), (dev, DEVELOPMENT)]
    by_condition = {**dev, **layers[0][0]}
    files = audio_paths(questioned, cfg, what="questioned")
    records = run_compare(comparer, files, refs, cal if cal is not None else layers)
    if fmt is TextFormat.json:
        for r in records:
            typer.echo(json.dumps(r, ensure_ascii=False))
    else:
        typer.echo(f"reference device: {refs.device} ({len(refs.files)} recording(s), {refs.source}); "
                   + (f"calibration {cal.sha256[:12]}: {cal.population.get('description')}" if cal else
                      f"calibrations of conditions {', '.join(sorted(by_condition))}" if by_condition else
                      "NO LR calibration of this scorer (run `devrecd calibrate`): scores only, no likelihood ratio"))
        for r in records:
            if r["outcome"] == "failed":
                typer.echo(f"{r['path']}: failed ({r['reason']}: {r['detail']})")
            elif r.get("log10_lr") is None:
                typer.echo(f"{r['path']}: score {r['score']:.4f}; no LR: {r['lr_withheld']}")
            else:
                cap = " (bounded)" if r["bounded"] else ""
                typer.echo(f"{r['path']}: score {r['score']:.4f}  log10 LR {r['log10_lr']:+.2f}{cap}  LR {r['lr']:.4g}  "
                           f"{r['verbal']}")
    if any(r["outcome"] == "failed" for r in records):
        raise typer.Exit(1)


@command()
def report(
    sources: List[Path] = typer.Argument(..., help="Daemon state folder(s), identify/compare --format json outputs (.jsonl), "
                                         "or recordings/folders (inventory only)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for report.html, report.json and the PNG figures."),
    case_id: Optional[str] = typer.Option(None, "--case-id", help="Case reference (report.case_id)."),
    examiner: Optional[str] = typer.Option(None, "--examiner", help="Examiner (report.examiner)."),
    laboratory: Optional[str] = typer.Option(None, "--laboratory", help="Laboratory (report.laboratory)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="export/NAME.onnx of the verdicts, for the model "
                                        "card (backend.model)."),
    registry: Optional[Path] = typer.Option(None, "--registry", "-r", help="Registry JSON (default: the one the verdicts name)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", exists=True, dir_okay=False,
                                               help="lr-calibration.json (default: the registry's)."),
    config: Optional[Path] = ConfigOption,
) -> None:
    """The case report: one self-contained HTML page (prints to PDF) and the same content as JSON."""
    from devrecd.report.collect import build_report
    from devrecd.report.render import write_report

    cfg = load_cli_config(config, {"report.case_id": case_id, "report.examiner": examiner,
                                   "report.laboratory": laboratory, "backend.model": model})
    doc, figures = build_report(sources, cfg, model=cfg.backend.model or None,
                                registry=str(registry) if registry else None,
                                calibration=str(calibration) if calibration else None)
    paths = write_report(doc, figures, out)
    s = doc["summary"]
    typer.echo(f"{s['files']} file(s): {s['judged']} judged, {s['compared']} compared, {s['failed']} failed, "
               f"{s['changed']} changed since intake, {s['missing']} missing")
    typer.echo(f"report: {paths['report.html']} (+ report.json, {len(figures.files)} figure(s))")
