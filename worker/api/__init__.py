"""The HTTP API (CONTRACT.md section 6), `python -m worker api`: one module per concern.

An entry point: may import any room and the Celery app and sender (tasks.app, tasks.chain),
never a stage task or a model library (enhancement goes through the `enhance` queue).
"""

from worker.api.app import create_app, main

__all__ = ["create_app", "main"]
