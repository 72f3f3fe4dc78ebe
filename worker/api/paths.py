"""Path parameters shared by the routers (and the watch-token check, which reads the id)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

from worker.jobs.model import SAFE_ID

JobId = Annotated[str, Path(pattern=SAFE_ID.pattern, description="the job's uuid")]
