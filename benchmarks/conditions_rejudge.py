"""Judge a finished ``benchmarks/conditions.py`` run's questioned files again, with another checkout's
serving code, against the run's own registries and scorer files.

A change that touches only how verdicts are made (condition matching, the decision) needs no new
folds: the same registries (``runs/baseline/<fold>/rotation-<k>/{enrolled,calibrated}``, copied per
label so that each code's caches stay its own) judged by two codes give its effect on the same
verdicts, in minutes instead of an hour. A change to ``train-gsv`` needs the full benchmark.

    # the run's conditions, judged by the new code (records in conditions.py's format)
    python benchmarks/conditions_rejudge.py rejudge --work /tmp/cond --code ../wt-new --label new \\
        --out /tmp/rejudge --conditions wav,level-30dB,first3s
    # conditions the run does not have are generated into --out and judged by both codes
    python benchmarks/conditions_rejudge.py rejudge ... --code ../wt-base --label base --extra level-10dB
    python benchmarks/conditions_rejudge.py rejudge ... --code ../wt-new --label new --extra level-10dB
    # baseline = the run's own baseline records (+ the base code's of the extra conditions); new = the new code's
    python benchmarks/conditions_rejudge.py merge --work /tmp/cond --out /tmp/rejudge
    python benchmarks/conditions.py --report-only --work /tmp/rejudge --conditions ... --baseline ../wt-base

Each ``rejudge`` runs the checkout's CLI in a subprocess (``PYTHONPATH=<checkout>``), as conditions.py does.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DECISIONS = (("as_enrolled", "enrolled"), ("after_calibrate", "calibrated"))


def plan_with_extra(work: Path, out: Path, extra: list[str]) -> dict:
    """The run's plan, with the ``extra`` conditions generated under ``out/questioned-extra`` and added."""
    sys.path.insert(0, str(HERE))
    import conditions as bench  # noqa: E402  (benchmarks/ is not a package)

    plan = json.loads((work / "plan.json").read_text())
    if extra:
        index = bench.generate(bench.read_ccnu(bench.SHARED / "ccnu_mobile_sample"), extra, out / "questioned-extra", None)
        for fold in plan["folds"]:
            fold["questioned"] += [{**f, "condition": c} for c in extra for f in index["files"][c]
                                   if f["device"] in fold["test_phones"]]
        plan["conditions"] = list(plan["conditions"]) + [c for c in extra if c not in plan["conditions"]]
    return plan


def record(fold: dict, k: int, rot: dict, decision: str, q: dict, rec: dict) -> dict:
    """conditions.py's record of one verdict, plus the comparison's storage and noise fields."""
    sys.path.insert(0, str(HERE))
    import conditions as bench  # noqa: E402  (benchmarks/ is not a package)

    comp = rec.get("comparison") or {}
    return {**bench.verdict_record(fold, k, rot, decision, q, rec),
            "references_stored_as": comp.get("references_stored_as"), "noise_matched": comp.get("noise_matched")}


def drive(args: argparse.Namespace) -> None:
    """Inside the checkout: every finished fold's registries judge the chosen conditions' files."""
    from devrecd.cli import app

    plan = json.loads(Path(args.plan).read_text())
    work, out = Path(args.work), Path(args.out)
    base = [json.loads(line) for line in open(work / "results-baseline.jsonl")]
    done = {d["fold_done"] for d in base if "fold_done" in d}
    conditions = set(args.conditions.split(","))
    only = set(args.folds.split(",")) if args.folds else None
    with open(out / f"results-{args.label}.jsonl", "w") as sink:
        sink.write(json.dumps({"meta": {"label": args.label, "code": args.code, "rejudged": str(work)}}) + "\n")
        for fold in plan["folds"]:
            if fold["name"] not in done or (only and fold["name"] not in only):
                continue
            t0 = time.perf_counter()
            by_path = {q["path"]: q for q in fold["questioned"] if q["condition"] in conditions}
            for k, rot in enumerate(fold["rotations"]):
                for decision, sub in DECISIONS:
                    src = work / "runs" / "baseline" / fold["name"] / f"rotation-{k}" / sub
                    dst = out / f"regs-{args.label}" / fold["name"] / f"rotation-{k}" / sub
                    if not dst.exists():
                        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("conditions", "plots"))
                    text = io.StringIO()
                    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(io.StringIO()):
                        try:
                            app(["identify", *by_path, "--registry", str(dst / "registry.json"), "--format", "json"],
                                prog_name="devrecd", standalone_mode=False)
                        except SystemExit:
                            pass  # a failed file is a record of its own
                    for line in text.getvalue().splitlines():
                        rec = json.loads(line) if line.startswith("{") else {}
                        q = by_path.get(rec.get("path"))
                        if q is not None:
                            sink.write(json.dumps(record(fold, k, rot, decision, q, rec)) + "\n")
            sink.write(json.dumps({"fold_done": fold["name"], "conditions": sorted(conditions),
                                   "wall": round(time.perf_counter() - t0, 1), "cpu": 0.0, "seconds": {}, "calls": {},
                                   "notes": []}) + "\n")
            sink.flush()
            print(f"[{args.label}] {fold['name']}: {time.perf_counter() - t0:.0f} s", flush=True)


def rejudge(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [c for c in (args.extra or "").split(",") if c]
    plan = plan_with_extra(Path(args.work), out, extra)
    (out / "plan.json").write_text(json.dumps(plan))
    conditions = ",".join([c for c in (args.conditions or "").split(",") if c] + extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVRECD_")}
    env.update(PYTHONPATH=str(Path(args.code).resolve()), DEVRECD_WATCH__TOP_K="10")
    subprocess.run([sys.executable, __file__, "drive", "--plan", str(out / "plan.json"), "--work", args.work,
                    "--out", str(out), "--label", args.label, "--conditions", conditions, "--code", str(args.code),
                    "--folds", args.folds],
                   env=env, cwd=str(out), check=True)


def merge(args: argparse.Namespace) -> None:
    """results-baseline.jsonl: the run's own baseline records of the conditions the new code judged,
    the ``base`` label's for the extra ones; results-new.jsonl: the ``new`` label's."""
    work, out = Path(args.work), Path(args.out)

    def load(p: Path) -> list[dict]:
        return [json.loads(line) for line in open(p)] if p.exists() else []

    new = [d for d in load(out / "results-new.jsonl") if "condition" in d]
    folds, conds = {d["fold"] for d in new}, {d["condition"] for d in new}
    extra = [d for d in load(out / "results-base.jsonl") if "condition" in d]
    extra_conds = {d["condition"] for d in extra}
    base = [d for d in load(work / "results-baseline.jsonl") if "condition" in d and d["fold"] in folds
            and d["condition"] in conds - extra_conds] + [d for d in extra if d["fold"] in folds]
    for name, recs in (("results-baseline.jsonl", base), ("results-new.jsonl", new)):
        meta = {"label": name[8:-6], "code": "conditions_rejudge merge"}
        done = [{"fold_done": f, "conditions": sorted(conds), "wall": 0.0, "cpu": 0.0, "seconds": {}, "calls": {},
                 "notes": []} for f in sorted(folds)]
        (out / name).write_text("".join(json.dumps(d) + "\n" for d in [{"meta": meta}, *recs, *done]))
    if not (out / "questioned").exists():
        (out / "questioned").symlink_to(work / "questioned")  # the report reads the run's exclusions
    print(f"baseline {len(base)} records, new {len(new)}, folds {sorted(folds)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rejudge")
    r.add_argument("--work", required=True, help="a finished benchmarks/conditions.py --work")
    r.add_argument("--code", required=True, type=Path, help="the checkout whose code judges")
    r.add_argument("--label", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--conditions", default="", help="conditions of the run to judge again")
    r.add_argument("--extra", default="", help="conditions the run lacks: generated and judged")
    r.add_argument("--folds", default="", help="only these folds (names; default: every finished one)")
    d = sub.add_parser("drive")  # internal: runs inside the checkout
    for a in ("--plan", "--work", "--out", "--label", "--conditions", "--code"):
        d.add_argument(a, required=True)
    d.add_argument("--folds", default="")
    m = sub.add_parser("merge")
    m.add_argument("--work", required=True)
    m.add_argument("--out", required=True)
    args = ap.parse_args()
    {"rejudge": rejudge, "drive": drive, "merge": merge}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
