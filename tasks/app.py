"""The Celery app; every process (workers, bridge, API, CLI, flower) shares this one.

Only the app and its settings (celeryconfig). What a worker adds to it, its bootsteps
(tasks/worker_steps.py) and signal handlers (tasks/worker_signals.py), attaches itself when
the `tasks` package is imported, as the stage tasks do: a module that imports the app to
send or to ask the workers gets none of them through this one.
"""

from celery import Celery

app = Celery("wan")
app.config_from_object("celeryconfig")
