"""The `enhance` stage, on its own queue so Qwen never shares a process with WAN."""

from __future__ import annotations

from enhancement import passthrough
from tasks.app import app
from tasks.base import StageTask
from worker.records import get_records


@app.task(base=StageTask, bind=True, name="wan.enhance", stage="enhance")
def enhance(self: StageTask, job_id: str) -> None:
    records = get_records()
    metadata = passthrough(records.get(job_id).job)
    if metadata:
        records.update(job_id, enhancement=metadata)
