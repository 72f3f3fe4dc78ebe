"""Celery settings, and only those: queues, routes, reliability and time limits.

Loaded by `tasks.app` with `config_from_object`; Redis comes from REDIS_URL (or its
Sentinel set, worker/connections.py).
"""

from kombu import Exchange, Queue

from worker.connections import celery_redis
from worker.flow.lanes import PRIORITY_STEPS
from worker.settings import get_settings

_redis = celery_redis(get_settings())

broker_url = _redis.url
result_backend = _redis.url
# Task results and PROGRESS states (`celery-task-meta-<task id>`): a day, or the records'
# life when that is shorter (README, "Keys in Redis").
result_expires = min(24 * 3600, get_settings().job_record_ttl_s)
broker_connection_retry_on_startup = True
# Redis restarts (a deploy, a crash, a failover): a worker that lost its broker reconnects
# for as long as it takes (None: no cap on the retries) instead of exiting after 100.
broker_connection_retry = True
broker_connection_max_retries = None
# A message sent while Redis restarts (the next stage of a chain, a retry, a final
# callback) waits for it about as long as a record write does (worker/jobs/records.py,
# REDIS_OUTAGE_RETRY: about 30 s), instead of kombu's default 0.6 s after which the chain
# was cut.
task_publish_retry_policy = {
    "max_retries": 20, "interval_start": 0, "interval_step": 0.5, "interval_max": 2,
}  # fmt: skip

# A task's state and result writes (STARTED, PROGRESS, SUCCESS) ride out a Redis restart or
# a Sentinel failover as a record write does (about 20-30 s of jittered backoff), instead of
# failing the task at the first connection error: Celery's result backend reads the old state
# with no retry at all, and a task whose STARTED write failed failed its job (what
# celery/celery#6348 and #10096 report of failovers). Off by default in Celery.
result_backend_always_retry = True
result_backend_max_retries = 12
result_backend_base_sleep_between_retries_ms = 100
result_backend_max_sleep_between_retries_ms = 4000

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]

# Queues: the GPU never waits for x264, network or disk. Each queue has its own exchange
# and routing key; bare Queue("gpu") objects would all show (and be bound with) the
# default queue's exchange and key "cpu".
task_queues = tuple(
    Queue(name, Exchange(name), routing_key=name) for name in ("gpu", "enhance", "cpu")
)
task_default_queue = "cpu"
# Routers in order, the first answer wins: encode, thumbnail and upload go to the media queue
# of the host whose spool holds the job's frames, `cpu.<WORKER_HOST>` (tasks/routing.py);
# everything else, and a job with no frames yet, by this table.
task_routes = (
    "tasks.routing.route_to_frames_host",
    {
        "wan.enhance": {"queue": "enhance"},
        "wan.enhance_prompt": {"queue": "enhance"},
        "wan.generate": {"queue": "gpu"},
        "wan.encode": {"queue": "cpu"},
        "wan.thumbnail": {"queue": "cpu"},
        "wan.upload": {"queue": "cpu"},
        "wan.callback": {"queue": "cpu"},
    },
)

# A worker killed mid-job must not lose the job: ack after the task, requeue on loss,
# and take one message at a time so a long generation never holds the next job hostage.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

#: The stage whose time limits (settings `<STAGE>_SOFT_LIMIT_S`, HARD_LIMIT_GRACE_S) each task
#: runs under. The soft one raises inside the task and is reported in the `failed` callback;
#: the hard one kills the pool child.
TASK_STAGES = {
    "wan.enhance": "enhance",
    "wan.enhance_prompt": "enhance",
    "wan.generate": "generate",
    "wan.encode": "encode",
    "wan.thumbnail": "thumbnail",
    "wan.upload": "upload",
    "wan.callback": "callback",
}
_limits = get_settings().stage_time_limits()
#: (soft, hard) time limits per task, seconds.
STAGE_TIME_LIMITS_S = {name: _limits[stage] for name, stage in TASK_STAGES.items()}
task_annotations = {
    name: {"soft_time_limit": soft, "time_limit": hard}
    for name, (soft, hard) in STAGE_TIME_LIMITS_S.items()
}
# Redis hands an unacked message out again after this long (BROKER_VISIBILITY_TIMEOUT_S):
# the backstop for the job of a worker killed whole. The media workers' lost-job sweep
# sends such a job again much sooner, within LOST_JOB_TIMEOUT_S (tasks/worker_steps.py),
# and the old message, when Redis hands it out, is skipped as superseded. It should outlast
# the longest task; a shorter one still never runs a healthy stage twice (the stage lease
# in the job record makes the second delivery wait), it only sends a duplicate. The sweep that hands
# messages out runs every fifth of it (at most every 10 s) instead of kombu's 100 s.
_visibility_timeout_s = get_settings().broker_visibility_timeout_s or 2 * max(
    hard for _, hard in STAGE_TIME_LIMITS_S.values()
)
# Priorities (worker/flow/lanes.py): each step of a queue is a Redis list, step 0 taken first;
# only generate messages carry one (images ahead of videos, fair share between users).
# `priority` order: a worker of several queues takes them in its -Q order at each step,
# not round robin.
broker_transport_options = {
    "priority_steps": list(PRIORITY_STEPS),
    "queue_order_strategy": "priority",
    "visibility_timeout": _visibility_timeout_s,
    "unacked_restore_interval": max(1, min(10, _visibility_timeout_s // 5)),
    "unacked_restore_throttle": 1,
    **_redis.transport_options,
}
# The result backend's own options: under Sentinel the master's name and how to reach the
# sentinels, and the same visibility timeout as the broker's (Celery's Redis caveats: the
# two option sets must agree).
result_backend_transport_options = {
    "visibility_timeout": _visibility_timeout_s,
    **_redis.transport_options,
}

# Visible in Flower: started state and events from workers and senders.
task_track_started = True
worker_send_task_events = True
task_send_sent_event = True
