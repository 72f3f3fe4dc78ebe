"""`celery -A tasks jobs ...`: the on-call engineer's look at jobs, and what can be done to them.

A celery subcommand through the `celery.commands` entry point (pyproject.toml), so it runs
with the app and settings of `-A tasks`. Tables for people, `--json` for scripts. Exit
codes: 0 done, 1 no such job, 2 refused in the job's state (click's usage errors are 2 too).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import click
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from worker.flow.job_control import Answer, cancel, retry
from worker.flow.sender import Sender
from worker.jobs.dead_letters import DeadLetters
from worker.jobs.records import get_records
from worker.jobs.views import STATUSES, JobSummary, dead_jobs, job_view, list_jobs

#: A duration as people write it: 90, 90s, 30m, 12h, 7d.
DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3_600, "d": 86_400}

as_json = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


class Duration(click.ParamType):
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        match = DURATION.fullmatch(str(value).strip())
        if match is None:
            self.fail(f"{value!r} is not a duration like 90s, 30m, 12h or 7d", param, ctx)
        return float(match[1]) * UNIT_S[match[2]]


@click.group()
def jobs() -> None:
    """Jobs in Redis: list, show, retry, cancel, dead letters."""


@jobs.command("list")
@click.option("--status", type=click.Choice(STATUSES), help="Only jobs in this status.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@as_json
def list_(status: str | None, limit: int, as_json: bool) -> None:
    """The newest jobs first."""
    summaries = list_jobs(get_records(), status=status, limit=limit)
    if as_json:
        _print_json(summaries)
        return
    title = f"newest {limit} jobs" + (f", {status}" if status else "")
    _print_summaries([(row, row.created_at) for row in summaries], title=title, when="created")


@jobs.command()
@click.argument("job_id")
@as_json
@click.pass_context
def show(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """One job: status, stage timings, attempts and deliveries, who runs it, error,
    callbacks sent."""
    records = get_records()
    record = records.get(job_id)
    if not record.fields:
        click.echo(f"no job {job_id}", err=True)
        ctx.exit(1)
    view = job_view(record, expires_at=records.expires_at(job_id))
    if as_json:
        _print_json(view)
        return
    console = Console()
    about = Table.grid(padding=(0, 2))
    for name, value in (
        ("job", view.job_id),
        ("type", view.job_type),
        ("status", view.status),
        ("stage", view.stage),
        ("created", _when(view.created_at)),
        ("progress", _progress(view.progress)),
        ("seed", view.seed),
        ("error", view.error and f"{view.error.stage}: {view.error.type}: {view.error.message}"),
        ("delivery error", view.delivery_error and view.delivery_error.message),
        ("cancel requested", _when(view.cancel_requested_at)),
        ("cancelled at stage", view.cancelled_stage),
        ("retries", view.retries or None),
        ("assets", ", ".join(asset.url for asset in view.assets) or None),
        ("record expires", _expires(view.expires_at, records.now())),
    ):
        if value is not None:
            about.add_row(name, str(value))
    console.print(about)
    stages = Table("stage", "attempts", "deliveries", "started", "seconds", "host", "run by",
                   title="stages")  # fmt: skip
    owners = {lease.stage: f"{lease.owner} until {_when(lease.until)}" for lease in view.leases}
    for stage, timing in view.timings.items():
        seconds = "running" if timing.seconds is None else f"{timing.seconds:.2f}"
        stages.add_row(stage, str(view.attempts[stage]), str(view.deliveries[stage]),
                       _when(timing.started_at), seconds, view.hosts.get(stage),
                       owners.get(stage))  # fmt: skip
    console.print(stages)
    callbacks = Table("callback", "accepted by the platform", title="callbacks sent")
    for status, at in sorted(view.callbacks.items(), key=lambda item: item[1]):
        callbacks.add_row(status, _when(at))
    console.print(callbacks)


@jobs.command("retry")
@click.argument("job_id")
@click.option("--from-start", is_flag=True, help="Run every stage again (the seed is kept).")
@click.option("--force", is_flag=True, help="Send a running or completed job again anyway.")
@as_json
@click.pass_context
def retry_(ctx: click.Context, job_id: str, from_start: bool, force: bool, as_json: bool) -> None:
    """Send a failed or cancelled job again from the stage it stopped at."""
    answer = retry(get_records(), job_id, sender=_sender(), from_start=from_start, force=force)
    _finish(ctx, answer, as_json)


@jobs.command("cancel")
@click.argument("job_id")
@as_json
@click.pass_context
def cancel_(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Cancel a job: a queued one at once, a running one at its next step or stage."""
    _finish(ctx, cancel(get_records(), job_id, sender=_sender()), as_json)


def _sender() -> Sender:
    """What sends the job again, or its callback: the app's, by task name. Imported here, not
    at the top: celery imports this module for each of its commands, before `-A` loads the
    app."""
    from tasks.chain import SENDER

    return SENDER


@jobs.command()
@as_json
def dead(as_json: bool) -> None:
    """The dead letters: jobs given up on after too many deliveries, oldest first."""
    entries = dead_jobs(get_records())
    if as_json:
        _print_json(entries)
        return
    _print_summaries(
        [(row, row.dead_at) for row in entries], title="dead letters", when="dead since"
    )


@jobs.command("purge-dead")
@click.option(
    "--older-than",
    type=Duration(),
    default="0",
    help="Only entries dead for longer than this (90s, 30m, 12h, 7d); default: all.",
)
@as_json
def purge_dead(older_than: float, as_json: bool) -> None:
    """Drop entries from the dead letters (their job records stay until they expire)."""
    purged = DeadLetters(get_records().redis).purge(older_than_s=older_than)
    if as_json:
        click.echo(json.dumps({"purged": purged}))
    else:
        click.echo(f"{purged} dead letter{'' if purged == 1 else 's'} purged")


def _finish(ctx: click.Context, answer: Answer, as_json: bool) -> None:
    """Print what a cancel or retry did and exit with its code."""
    if as_json:
        body = {"job_id": answer.job_id, "status": answer.status, "message": answer.message}
        click.echo(json.dumps(body | {"outcome": answer.outcome.name.lower()}))
    else:
        click.echo(answer.message, err=answer.outcome.value != 0)
    ctx.exit(answer.outcome.value)


def _print_summaries(rows: list[tuple[JobSummary, float | None]], *, title: str, when: str) -> None:
    """One line per job; `when` names the time column."""
    table = Table(title=title)
    for column in ("job", "type", "status", "stage", when):
        table.add_column(column, no_wrap=True)
    table.add_column("error", overflow="ellipsis", max_width=60)
    for row, at in rows:
        table.add_row(row.job_id, row.job_type, row.status, row.stage, _when(at), row.error)
    Console().print(table)


def _print_json(data: BaseModel | list[BaseModel]) -> None:
    items = data if isinstance(data, list) else [data]
    dumped = [item.model_dump(mode="json") for item in items]
    click.echo(json.dumps(dumped if isinstance(data, list) else dumped[0], indent=2))


def _progress(event: dict[str, Any] | None) -> str | None:
    """`42.5 % (generate, step 12 of 25)` from the latest progress event."""
    if not event or event.get("percent") is None:
        return None
    where = event.get("stage") or event.get("status")
    if "step" in event:
        where = f"{where}, step {event['step']} of {event['total_steps']}"
    return f"{event['percent']} % ({where})"


def _expires(at: float | None, now: float) -> str | None:
    """When, and in how long: `2025-06-01 12:00:00 (in 6.9 d, unless written again)`."""
    if at is None:
        return None
    left_s = at - now
    unit, size = next((u, s) for u, s in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))
                      if left_s >= s or u == "s")  # fmt: skip
    return f"{_when(at)} (in {left_s / size:.1f} {unit}, unless written again)"


def _when(at: float | None) -> str | None:
    """Local time to the second, as an operator compares it with logs."""
    return None if at is None else datetime.fromtimestamp(at).isoformat(" ", "seconds")
