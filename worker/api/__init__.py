"""The worker's HTTP API (CONTRACT.md section 6): `python -m worker api`, FastAPI on uvicorn.

Nothing heavy lives here: enhancement goes through the `enhance` queue, jobs through the
same submit path as the bridge. One module per concern: auth, health, enhance, jobs,
debug, registration; `app` puts them together.
"""

from worker.api.app import create_app, main

__all__ = ["create_app", "main"]
