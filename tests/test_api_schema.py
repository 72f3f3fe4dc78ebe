"""Schemathesis against the served OpenAPI schema: no 5xx, no answer outside the schema.

The API runs as its own process on a Redis database no worker consumes, so generated
jobs are never run; /enhance gets a short wait, as no enhancement worker answers there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import auth
from worker.local.stack import LocalStack, free_port

#: Examples per operation: enough to reach every validator, few enough for CI.
EXAMPLES_PER_OPERATION = 40


@pytest.fixture(scope="module")
def api_base_url(
    stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    port = free_port()
    idle_db = stack_env["REDIS_URL"].removesuffix("/0") + "/7"
    env = stack_env | {
        "API_PORT": str(port),
        "REDIS_URL": idle_db,
        "PLATFORM_REDIS_URL": idle_db,
        "ENHANCE_TIMEOUT_S": "0.2",
        "ENHANCE_QUEUE_WAIT_S": "0.2",
    }
    api = LocalStack(env, log_dir=tmp_path_factory.mktemp("schema-api"), names=("api",))
    api.start(timeout_s=60)
    yield f"http://127.0.0.1:{port}"
    api.stop()
    redis.Redis.from_url(idle_db).flushdb()  # the generated jobs it accepted, never run


def excluded(operation: schemathesis.APIOperation) -> list:
    """POST /jobs has cross-field rules JSON Schema cannot say (an image makes one frame, a
    legal `config` key with a value out of its range): a schema-valid body may be refused."""
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    return [positive_data_acceptance] if operation.path == "/jobs" else []


@pytest.fixture(scope="module")
def api_schema(api_base_url: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{api_base_url}/openapi.json")


def test_the_api_keeps_to_its_schema(
    api_schema: schemathesis.BaseSchema, api_base_url: str
) -> None:
    # Every operation, with generated (mostly invalid) inputs and the right key; the event
    # stream ends only with its job, so test_progress.py checks it instead.
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if operation.path.endswith("/events"):
            continue

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def keeps_to_schema(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=api_base_url, headers=auth(), excluded_checks=excluded(case.operation)
            )

        keeps_to_schema()


def test_the_schema_documents_every_endpoint(api_schema: schemathesis.BaseSchema) -> None:
    paths = set(api_schema.raw_schema["paths"])

    assert paths == {
        "/health", "/health/details", "/metrics", "/enhance", "/jobs", "/jobs/{job_id}",
        "/jobs/{job_id}/events", "/jobs/{job_id}/cancel", "/jobs/{job_id}/retry", "/debug/env",
        "/jobs/{job_id}/watch-token", "/jobs/{job_id}/preview", "/jobs/{job_id}/result",
        "/jobs/{job_id}/thumbnail",
    }  # fmt: skip


def test_the_interactive_docs_are_served(api_base_url: str) -> None:
    assert httpx.get(f"{api_base_url}/docs", timeout=10).status_code == 200


def test_the_enhance_prompt_pattern_means_the_same_in_every_regex_engine() -> None:
    # Given the pattern a client reads from the schema for /enhance's prompt
    from worker.api.app import create_app

    schema = create_app().openapi()["components"]["schemas"]["EnhanceRequest"]
    pattern = schema["properties"]["prompt"]["pattern"]

    # Then it names no shorthand class whose members differ between Python and ECMA
    # engines (\s, \S, \w, \W, \d, \D, \b), and accepts exactly what str.strip() keeps
    assert not re.search(r"\\[sSwWdDbB]", pattern), pattern
    tricky = "\x1c\x1d\x1e\x1f\x85\xa0\u1680\u200b\u2028\u3000\ufeff a\t"
    for char in tricky:
        assert (re.fullmatch(pattern, char) is None) == char.isspace(), repr(char)
