"""How jobs move: bridge, dispatch, lanes, cancel and retry, callbacks and their outbox, sweeps.

May import worker.jobs, worker.observe and the root, never `tasks`: it is handed a `Sender`.
"""
