"""Celery settings, and only those: queues, routes, reliability and time limits.

Loaded by `tasks.app` with `config_from_object`; Redis comes from REDIS_URL.
"""

from kombu import Exchange, Queue

from worker.settings import get_settings

_redis_url = get_settings().redis_url

broker_url = _redis_url
result_backend = _redis_url
result_expires = 24 * 3600
broker_connection_retry_on_startup = True

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
task_routes = {
    "wan.enhance": {"queue": "enhance"},
    "wan.enhance_prompt": {"queue": "enhance"},
    "wan.generate": {"queue": "gpu"},
    "wan.encode": {"queue": "cpu"},
    "wan.thumbnail": {"queue": "cpu"},
    "wan.upload": {"queue": "cpu"},
    "wan.callback": {"queue": "cpu"},
}

# A worker killed mid-job must not lose the job: ack after the task, requeue on loss,
# and take one message at a time so a long generation never holds the next job hostage.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

#: (soft, hard) time limits per stage, seconds. The soft one raises inside the task and is
#: reported in the `failed` callback; the hard one kills the pool child.
STAGE_TIME_LIMITS_S = {
    "wan.enhance": (120, 150),
    "wan.enhance_prompt": (120, 150),
    "wan.generate": (1_800, 1_900),
    "wan.encode": (300, 330),
    "wan.thumbnail": (60, 90),
    "wan.upload": (300, 330),
    "wan.callback": (60, 90),
}
task_annotations = {
    name: {"soft_time_limit": soft, "time_limit": hard}
    for name, (soft, hard) in STAGE_TIME_LIMITS_S.items()
}
# Redis re-delivers an unacked message after this long: it must outlast the longest task,
# or a healthy long generation would be handed to a second worker.
broker_transport_options = {
    "visibility_timeout": 2 * max(hard for _, hard in STAGE_TIME_LIMITS_S.values())
}

# Visible in Flower: started state and events from workers and senders.
task_track_started = True
worker_send_task_events = True
task_send_sent_event = True
