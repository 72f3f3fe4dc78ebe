"""No secret value, nor any part of one, in what the API shows or any process logs.

(The session-wide check in conftest.py repeats the log scan over every test's processes.)
"""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import (
    API_KEY,
    CALLBACK_SECRET,
    JOB_TIMEOUT_S,
    SERVICE_KEY,
    api_url,
    auth,
    new_job,
    push,
    secret_leaks,
)  # fmt: skip
from worker.local.platform import LocalPlatform
from worker.local.stack import LocalStack
from worker.settings import SECRET_FIELDS, Settings

SECRETS = [SERVICE_KEY, CALLBACK_SECRET, API_KEY]


def test_the_leak_finder_finds_a_fragment() -> None:
    text = f"connecting with key ...{SERVICE_KEY[5:20]}..."

    assert secret_leaks({"log": text}, SECRETS)
    assert not secret_leaks({"log": "nothing to see"}, SECRETS)


def test_no_secret_in_debug_env_or_any_log_after_jobs_failures_and_refusals(
    stack: LocalStack, stack_env: dict[str, str], platform: LocalPlatform, platform_list
) -> None:
    # Given a completed job, a failed one, a refused request and an enhancement
    good, bad = new_job("image7b_fast_enhanced"), new_job("image_fast")
    bad["config"]["frame_num"] = 999
    push(platform_list, good)
    push(platform_list, bad)
    platform.wait_for_final(good["id"], timeout_s=JOB_TIMEOUT_S)
    platform.wait_for_final(bad["id"], timeout_s=JOB_TIMEOUT_S)
    httpx.post(f"{api_url(stack_env)}/enhance", json={"prompt": "x y"}, headers=auth("nope"))
    httpx.post(f"{api_url(stack_env)}/enhance", json={"prompt": "a fox"}, headers=auth())

    debug_env = httpx.get(f"{api_url(stack_env)}/debug/env", headers=auth(), timeout=10).text
    logs = {name: stack.log(name) for name in stack.names}

    assert secret_leaks({"/debug/env": debug_env, **logs}, SECRETS) == []
    assert all(logs.values())  # the processes did log


@pytest.mark.parametrize("blank", ["", "   ", "\t\n"])
def test_a_blank_secret_is_unset_everywhere(blank: str) -> None:
    # `KEY=` in an env file reads as an empty string, not as no value
    settings = Settings(_env_file=None, **dict.fromkeys(SECRET_FIELDS, blank))

    assert all(getattr(settings, name) is None for name in SECRET_FIELDS)
    assert {name: settings.masked()[name] for name in SECRET_FIELDS} == dict.fromkeys(
        SECRET_FIELDS, "unset"
    )
