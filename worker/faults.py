"""Test-only faults: make the real processes fail where production ones do, on purpose.

`WAN_TEST_FAULT` holds rules separated by `;`, each `<job id prefix>:<action>@<point>`,
optionally `/<preset>` to match only generation at that quality preset:

    poison-:crash@step1;oom-high-:oom@step1/high;oom-all-:oom@step1;slow-:hang@step1;
    long-:pause12@step1;stuck-:stuck@step1

Actions:
- `crash`: SIGKILL this process at once (what the OOM killer or a preempted pod does);
- `oom`: raise `torch.OutOfMemoryError` (what a card too small for the job does);
- `hang`: sleep until a time limit or a signal ends it (a stuck kernel, a dead NFS mount);
- `stuck`: sleep through the soft time limit too, until the hard one kills the process (a
  CUDA kernel that no signal interrupts);
- `pause<seconds>`: sleep that long, then go on (a slow but healthy stage);
- `refuse`: raise kombu's OperationalError (what a publish raises when the broker stays
  away past its retries).

Points: `step<k>` (the end of denoising step k, counted from 1, in every window of a long
video), `window<n>_step<k>` (the same, in window n only), `bridge_taken` (the bridge
holds an item it has not dispatched yet), `bridge_sent` (its chain is sent, not yet marked),
`callback_publish` (a final status is written with its callback due, which is about to be
handed to the broker; not the lost-job sweep's resend), `callback_post` (a final callback's
worker holds its lease and has not posted it yet), `progress_callback` (a progress callback
is in flight, not yet posted: a slow network).

Unset, nothing here does anything; a malformed rule is refused when the process starts, so
a typo never passes for a fault that did not fire. Production never sets it.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

ENV = "WAN_TEST_FAULT"
Action = Literal["crash", "oom", "hang", "stuck", "pause", "refuse"]
#: The actions written as they are; `pause` carries its seconds: `pause12`.
PLAIN_ACTIONS: tuple[Action, ...] = ("crash", "oom", "hang", "stuck", "refuse")
PAUSE = re.compile(r"pause(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Rule:
    job_prefix: str
    action: Action
    point: str
    preset: str | None = None
    #: How long a `pause` sleeps.
    pause_s: float = 0.0

    def matches(self, point: str, job_id: str, preset: str | None) -> bool:
        return (
            self.point == point
            and job_id.startswith(self.job_prefix)
            and (self.preset is None or self.preset == preset)
        )


def parse(spec: str) -> tuple[Rule, ...]:
    """The rules of a `WAN_TEST_FAULT` value; ValueError names the malformed rule."""
    rules = []
    for text in filter(None, (part.strip() for part in spec.split(";"))):
        prefix, sep, rest = text.partition(":")
        action, at, where = rest.partition("@")
        point, _, preset = where.partition("/")
        pause = PAUSE.fullmatch(action)
        if not (sep and at and point) or (action not in PLAIN_ACTIONS and not pause):
            raise ValueError(
                f"{ENV}: malformed rule {text!r}; expected "
                f"'<job id prefix>:<{'|'.join(PLAIN_ACTIONS)}|pause<seconds>>@<point>[/<preset>]'"
            )
        rules.append(
            Rule(prefix, "pause" if pause else action, point, preset or None,  # type: ignore[arg-type]
                 float(pause.group(1)) if pause else 0.0)
        )  # fmt: skip
    return tuple(rules)


@lru_cache(maxsize=1)
def rules() -> tuple[Rule, ...]:
    return parse(os.environ.get(ENV, ""))


def hit(point: str, job_id: str, *, preset: str | None = None) -> None:
    """Fail here if a rule says so for this job; otherwise return at once."""
    for rule in rules():
        if rule.matches(point, job_id, preset):
            _act(rule, job_id)


def step_point(step: int) -> str:
    return f"step{step}"


def window_step_point(window: int, step: int) -> str:
    return f"window{window}_step{step}"


def _act(rule: Rule, job_id: str) -> None:
    what = f"{ENV}: {rule.action} at {rule.point} for job {job_id}"
    if rule.action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if rule.action == "oom":
        import torch  # only generation points raise this, in a process that has torch

        raise torch.OutOfMemoryError(what)
    if rule.action == "pause":
        time.sleep(rule.pause_s)
        return
    if rule.action == "refuse":
        from kombu.exceptions import OperationalError  # only publishing points raise this

        raise OperationalError(what)
    while True:  # hang: a Celery time limit (or a signal) is the only way out
        try:
            time.sleep(1)
        except Exception:  # the soft time limit's: only `stuck` takes no notice
            if rule.action != "stuck":
                raise
