"""Live progress of one statement's Spark jobs, read from SparkContext's status tracker.

Each statement runs in its own job group, so the jobs of a statement are exactly the jobs of
that group. Progress is tasks completed / tasks in all stages of those jobs, as Livy computes it.
"""

from __future__ import annotations

import threading
from typing import Any, Callable


def job_group(statement_id: int) -> str:
    return f"statement-{statement_id}"


def snapshot(sc: Any, group: str) -> tuple[float, list[dict[str, Any]]]:
    """(progress 0..1, one summary per job) for the jobs of ``group``."""
    tracker = sc.statusTracker()
    total = done = 0
    jobs = []
    for job_id in sorted(tracker.getJobIdsForGroup(group)):
        info = tracker.getJobInfo(job_id)
        if info is None:
            continue
        job_total = job_done = job_active = job_failed = 0
        stage_name = ""
        for stage_id in info.stageIds:
            stage = tracker.getStageInfo(stage_id)
            if stage is None:
                continue
            job_total += stage.numTasks
            job_done += stage.numCompletedTasks
            job_active += stage.numActiveTasks
            job_failed += stage.numFailedTasks
            if stage.numActiveTasks or not stage_name:
                stage_name = stage.name
        total += job_total
        done += job_done
        jobs.append(
            {
                "jobId": job_id,
                "status": str(info.status),
                "stage": stage_name,
                "numTasks": job_total,
                "numCompletedTasks": job_done,
                "numActiveTasks": job_active,
                "numFailedTasks": job_failed,
            }
        )
    return (done / total if total else 0.0), jobs


class ProgressReporter:
    """Polls the running statement's job group and reports changes through ``send``.

    Polling starts ``delay`` seconds into a statement, so trivial statements cost nothing.
    """

    def __init__(self, sc: Any, send: Callable[[dict[str, Any]], None], interval: float = 0.25) -> None:
        self.sc = sc
        self.send = send
        self.interval = interval
        self._current: int | None = None
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="studio-progress", daemon=True)
        self._thread.start()

    def begin(self, statement_id: int) -> None:
        with self._wake:
            self._current = statement_id
            self._wake.notify()

    def end(self) -> None:
        with self._wake:
            self._current = None

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._current is None:
                    self._wake.wait()
                statement_id = self._current
            last: tuple[float, list[dict[str, Any]]] | None = None
            while True:
                with self._wake:
                    self._wake.wait_for(lambda: self._current != statement_id, timeout=self.interval)
                    if self._current != statement_id:
                        break
                try:
                    current = snapshot(self.sc, job_group(statement_id))
                except Exception:  # noqa: BLE001, S112 - a py4j hiccup must not stop progress for good
                    continue
                if current != last and current[1]:
                    last = current
                    self.send({"op": "progress", "id": statement_id, "progress": current[0], "jobs": current[1]})
