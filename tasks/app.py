"""The Celery app; every process (workers, bridge, flower) shares this one."""

from celery import Celery

app = Celery("wan")
app.config_from_object("celeryconfig")
