"""The verdict writer's group commit (devrecd/pipeline/writer.py): the results waiting when it wakes
are committed together, each exactly once, and a content shared by two files in flight is judged once
even when both verdicts arrive in one group."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from devrecd.config import load_config
from devrecd.metrics import Metrics
from devrecd.pipeline.jobs import Failed, Job, Scored, Stop
from devrecd.pipeline.journal import Journal, Recorder, VerdictLog
from devrecd.pipeline.retry import Liveness, StorageRetry
from devrecd.stages import Failure
from devrecd.pipeline.writer import VerdictWriter


def _owner(tmp_path: Path, journal: Journal, log: VerdictLog) -> SimpleNamespace:
    metrics, stop = Metrics(CollectorRegistry()), threading.Event()
    released: list[int] = []
    return SimpleNamespace(
        _results=queue.Queue(), recorder=Recorder(journal, log), journal=journal, metrics=metrics,
        storage=StorageRetry(metrics, Liveness(), stop), liveness=Liveness(), _lock=threading.Lock(), _shared=set(),
        rejudge=False, on_record=None, labels=(), cfg=load_config(None, env={}), backend_info={"name": "test"},
        _release=lambda job: released.append(job.entry_id), released=released)


def test_the_waiting_results_are_committed_as_one_group_each_exactly_once(tmp_path: Path, monkeypatch) -> None:
    journal, log = Journal(tmp_path / "j.sqlite"), VerdictLog(tmp_path / "v.jsonl")
    owner = _owner(tmp_path, journal, log)
    groups: list[int] = []
    finish_many = journal.finish_many
    monkeypatch.setattr(journal, "finish_many", lambda items: groups.append(len(items)) or finish_many(items))
    ids = [journal.see(f"/ev/{i}.wav", i, i)[0].id for i in range(10)]
    for i in ids:
        owner._results.put(Failed(Job(i, f"/ev/{i}.wav"), Failure("corrupt", "not audio")))
    owner._results.put(Stop())
    VerdictWriter(owner).run()
    assert groups == [10], "one journal transaction for the ten verdicts waiting"
    lines = [json.loads(x) for x in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ids and {r["outcome"] for r in lines} == {"failed"}
    assert journal.counts() == {"failed": 10} and journal.unlogged() == []
    assert sorted(owner.released) == ids, "every file leaves the in-flight bookkeeping once committed"
    journal.close()
    log.close()


def test_a_content_shared_in_one_group_is_judged_once_and_then_its_duplicate(tmp_path: Path) -> None:
    journal, log = Journal(tmp_path / "j.sqlite"), VerdictLog(tmp_path / "v.jsonl")
    owner = _owner(tmp_path, journal, log)
    sha = "ab" * 32
    owner._shared.add(sha)  # both files were in flight at once
    jobs = []
    for i in range(2):
        e, _ = journal.see(f"/ev/{i}.wav", 1, 1)
        journal.mark_hashed(e.id, sha, 1)
        job = Job(e.id, f"/ev/{i}.wav", content=sha, recording={"path": f"/ev/{i}.wav", "sha256": sha, "size": 1})
        jobs.append(job)
        owner._results.put(Scored(job, {"device": "inconclusive", "candidate": "p", "score": 0.9, "log10_lr": None,
                                        "condition_status": "unvalidated",
                                        "comparison": {"compared_under": "band0-3828", "status": "unvalidated"}}))
    owner._results.put(Stop())
    VerdictWriter(owner).run()
    lines = [json.loads(x) for x in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [(r["id"], r["outcome"]) for r in lines] == [(jobs[0].entry_id, "judged"), (jobs[1].entry_id, "duplicate")]
    assert lines[1]["duplicate_of"] == jobs[0].entry_id and lines[1]["device"] == "inconclusive"
    # The duplicate repeats what the verdict rests on, not a device without its status.
    for key in ("candidate", "log10_lr", "condition_status", "comparison"):
        assert lines[1][key] == lines[0][key], key
    journal.close()
    log.close()
