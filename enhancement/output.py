"""What of Qwen's continuation becomes the prompt WAN receives, and what is refused."""

from __future__ import annotations

import re

from enhancement.prompts import ANSWER_LABEL, IDEA_LABEL
from worker.jobs.model import PROMPT_MAX_CHARS

#: Shorter than this is no enhancement of anything.
MIN_CHARS = 10
#: A line that starts a new section: the model echoing the document's own structure.
_HEADING = re.compile(
    rf"^\s*(?:{re.escape(IDEA_LABEL)}|{re.escape(ANSWER_LABEL)}|#|\*\*|[A-Z][\w ]{{0,30}}:\s*$)"
)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


class RejectedOutput(ValueError):
    """The continuation is not a usable prompt; the message says why."""


def clean_continuation(text: str, *, original: str) -> str:
    """The first paragraph of the continuation, trimmed to the prompt limit; or RejectedOutput.

    Cut at the first blank line or echoed heading, join the lines, drop wrapping quotes,
    trim at a word boundary to PROMPT_MAX_CHARS. Refused: empty, under MIN_CHARS, the user's
    prompt unchanged, or anything that is not printable text.
    """
    paragraph = _BLANK_LINE.split(text.replace("\r\n", "\n"), maxsplit=1)[0]
    lines = []
    for line in paragraph.split("\n"):
        if _HEADING.match(line):
            break
        lines.append(line.strip())
    prompt = " ".join(line for line in lines if line).strip().strip("\"'“”").strip()
    if len(prompt) > PROMPT_MAX_CHARS:
        prompt = prompt[:PROMPT_MAX_CHARS].rsplit(" ", 1)[0].rstrip(" ,;:")
    if not prompt:
        raise RejectedOutput("empty continuation")
    if len(prompt) < MIN_CHARS:
        raise RejectedOutput(f"{len(prompt)} characters is under the minimum of {MIN_CHARS}")
    if not prompt.isprintable() or "\ufffd" in prompt:
        raise RejectedOutput("the continuation holds non-printable characters")
    if _normalised(prompt) == _normalised(original):
        raise RejectedOutput("the continuation repeats the user's prompt unchanged")
    return prompt


def _normalised(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" .")
