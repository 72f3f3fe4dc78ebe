"""What the platform list may hold, for the fuzz tests: odd JSON values and job fields, and
the id a correct bridge can answer (hypothesis strategies shared by the fuzz modules)."""

from __future__ import annotations

import json
import re
from decimal import Decimal

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
    """The id a correct bridge can answer: from UTF-8 JSON, either body shape (CONTRACT 1),
    whatever its numbers (decimals here, of any length; a number is never an id: ids are
    strings). Nesting too deep for Python's decoder counts as no id: only `extreme_jobs` makes
    objects that deep, and it names their ids."""
    try:
        body = json.loads(raw.decode(), parse_int=Decimal)
        if isinstance(body, list) and len(body) == 1 and isinstance(body[0], str):
            body = json.loads(body[0], parse_int=Decimal)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    job_id = body.get("id") or body.get("job_id")
    return job_id if isinstance(job_id, str) and USABLE_ID.fullmatch(job_id) else None


# --- Valid JSON that Python's decoder refuses or bends: RFC 8259 sets no limits -----------

#: The top-level fields the frontend's job builder (`submitWANJob`) also sends.
FRONTEND_FIELDS = ("width", "height", "frame_num", "fps", "reference_mode", "reference_image_url",
                   "first_frame", "last_frame", "denoise_strength", "reference_strength",
                   "target_worker")  # fmt: skip
METADATA_KEYS = ("reference_image_url", "start_reference_url", "denoise_strength",
                 "reference_strength", "video_reference_mode", "note")  # fmt: skip

#: Number texts: integers over Python's 4,300-digit limit, magnitudes past a float's range.
extreme_numbers = st.one_of(
    st.integers(4_301, 6_000).map(lambda digits: "9" * digits),
    st.integers(4_301, 6_000).map(lambda digits: "-1" + "0" * digits),
    st.sampled_from(["1e400", "-1e400", "1E+999999999", "1e-400", "0.5e308", "-0"]),
    st.from_regex(r"-?(0|[1-9][0-9]{0,25})(\.[0-9]{1,25})?([eE][-+]?[0-9]{1,4})?", fullmatch=True),
)
#: Strings of any content, lone surrogates included, as JSON escapes them (`\ud800`).
any_strings = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=12).map(
    json.dumps
)
#: Nesting past any limit a decoder may set: Python's recursion ends near 1,000 levels.
deep_nesting = st.tuples(st.sampled_from([40, 200, 3_000]), st.sampled_from("[{")).map(
    lambda shape: (
        ("[" * shape[0] + "0" + "]" * shape[0])
        if shape[1] == "["
        else ('{"a":' * shape[0] + "0" + "}" * shape[0])
    )
)
extreme_texts = st.recursive(
    extreme_numbers | any_strings | deep_nesting | json_values.map(json.dumps),
    lambda children: (
        st.lists(children, max_size=3).map(lambda items: f"[{','.join(items)}]")
        | st.lists(st.tuples(any_strings, children), max_size=3).map(
            lambda pairs: "{" + ",".join(f"{key}:{value}" for key, value in pairs) + "}"
        )
    ),
    max_leaves=4,
)


def json_object(fields: dict[str, str]) -> str:
    """An object's text from its keys and the texts of their values."""
    return "{" + ",".join(f"{json.dumps(key)}:{value}" for key, value in fields.items()) + "}"


@st.composite
def extreme_jobs(draw: st.DrawFn) -> tuple[bytes, str]:
    """A valid JSON job body with a usable id and extreme values anywhere else, in either
    body shape; with the id it carries (a correct bridge answers it, never parks it)."""
    job_id = draw(st.from_regex(USABLE_ID, fullmatch=True))
    fields = {
        draw(st.sampled_from(["id", "job_id"])): json.dumps(job_id),
        "type": json.dumps(draw(st.sampled_from(["image_fast", "video_fast"]))),
        "prompt": json.dumps("a lighthouse at dusk"),
        "user_id": json.dumps("user-1"),
    }
    places = (*FIELDS, *FRONTEND_FIELDS, "unread_field")
    for name in draw(st.lists(st.sampled_from(places), max_size=3, unique=True)):
        fields[name] = draw(extreme_texts)
    for section, keys in (("config", CONFIG_KEYS), ("metadata", METADATA_KEYS)):
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from((*keys, "unread_key")), max_size=2, unique=True))
            fields[section] = json_object({key: draw(extreme_texts) for key in chosen})
    text = json_object(fields)
    if draw(st.booleans()):
        text = json.dumps([text])
    return text.encode(), job_id
