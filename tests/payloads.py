"""What the platform list may hold, for the fuzz tests: odd JSON values and job fields, and
the id a correct bridge can answer (hypothesis strategies shared by the fuzz modules)."""

from __future__ import annotations

import json
import re

from hypothesis import strategies as st

#: CONTRACT/DESIGN: ids become keys and paths, so only these, matched on the whole string.
USABLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")

#: Any JSON value: huge and negative integers, NaN and infinities, unicode, nested junk.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
FIELDS = ("type", "job_type", "prompt", "user_id", "negative_prompt", "config", "metadata",
          "video_id", "image_id", "quality")  # fmt: skip
CONFIG_KEYS = ("resolution", "size", "frame_num", "num_inference_steps", "guidance_scale",
               "seed", "enhance_prompt", "sample_shift", "denoise_strength")  # fmt: skip


def usable_id(raw: bytes) -> str | None:
    """The id a correct bridge can answer: from UTF-8 JSON, either body shape (CONTRACT 1)."""
    try:
        body = json.loads(raw.decode())
        if isinstance(body, list) and len(body) == 1 and isinstance(body[0], str):
            body = json.loads(body[0])
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    job_id = body.get("id") or body.get("job_id")
    return job_id if isinstance(job_id, str) and USABLE_ID.fullmatch(job_id) else None
