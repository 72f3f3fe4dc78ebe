"""The job model: the platform's two body shapes and two generations of names in, one typed job out.

CONTRACT.md sections 1, 2 and 5 are the specification. Every check names the field the
platform sent and the limit it broke, so a `failed` callback tells the user what to fix.

Every value is read from the places listed for it below, the first one that gives it
winning: `config`, then `metadata`, then the top level, where the frontend's own job builder
(`submitWANJob`) puts `width`, `height`, `frame_num`, `fps`, `quality`, the references and
strengths. A `null` anywhere is "not given".

References follow one rule: the references present decide the mode, and a mode field
(`reference_mode`, `video_reference_mode`, config before metadata before top level) that
names another mode is ignored and reported in the callback's `reference_mode_note`; see
`_references`.

A body is any valid JSON (`worker.jobs.any_json`): a value Python cannot hold, text UTF-8
cannot carry (a lone surrogate) or a number beyond a float's range is refused by name where
the job reads or keeps it, and ignored where it does not.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from worker.errors import InvalidJob
from worker.jobs import any_json
from worker.jobs.any_json import Unreadable

#: Job ids and user ids become parts of Redis keys and storage paths: only these characters,
#: matched against the whole string (`fullmatch`: `$` would let a trailing newline through).
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
#: `WIDTHxHEIGHT` / `WIDTH*HEIGHT` with ASCII digits only (`\d` would take any script's digits).
SIZE_PATTERN = re.compile(r"\s*([0-9]+)\s*([x*])\s*([0-9]+)\s*")
#: Supabase Storage bucket the platform reads results from.
BUCKET = "workspace-temp"
#: Frames per second of a video whose job names none, and the range a job may name.
FPS = 16
FPS_MIN, FPS_MAX = 12, 24
#: The only `target_worker` this worker takes (the platform also has others).
TARGET_WORKER = "wan"
#: The model every job type uses, as the platform names it in callbacks.
WAN_TASK = "t2v-1.3B"

FRAMES_MIN, FRAMES_MAX = 1, 121
#: A video job may ask for more frames than one pass makes: up to 60 s at 16 fps, made window
#: by window (CONTRACT.md section 7, worker/generation/windows.py).
LONG_FRAMES_MAX = 961
SIZE_MIN_PX, SIZE_MAX_PX, SIZE_STEP_PX = 256, 1280, 16
STEPS_MIN, STEPS_MAX = 1, 100
GUIDANCE_MIN, GUIDANCE_MAX = 0.0, 20.0
SHIFT_MIN, SHIFT_MAX = 0.0, 20.0
PROMPT_MAX_CHARS = 2_000
SEED_MAX = 2**32 - 1
DEFAULT_WIDTH_PX, DEFAULT_HEIGHT_PX = 480, 832
DEFAULT_SHIFT = 5.0

#: Nesting levels `metadata` may have: it is kept in the record as it came.
METADATA_DEPTH_MAX = 32
#: Keys of `metadata` an error names as `metadata.key`; others are quoted in brackets.
PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Longest job type kept from a body that was refused before parsing.
TYPE_NAME_MAX_CHARS = 64

ReferenceMode = Literal["none", "single", "start", "end", "both"]
REFERENCE_MODES: tuple[ReferenceMode, ...] = ("none", "single", "start", "end", "both")

# Where each value is read, first given wins (CONTRACT.md section 1): `config.x` and
# `metadata.x` inside those objects, a bare name at the top level.
STEPS_FROM = ("config.num_inference_steps", "config.sample_steps")
GUIDANCE_FROM = ("config.guidance_scale", "config.sample_guide_scale")
SHIFT_FROM = ("config.sample_shift",)
FRAMES_FROM = ("config.frame_num", "frame_num")
DURATION_FROM = ("config.duration_seconds",)
SEGMENTS_FROM = ("config.segments",)
FPS_FROM = ("fps",)
QUALITY_FROM = ("quality",)
TARGET_WORKER_FROM = ("target_worker",)
#: The size: `config.resolution` or `config.size` as one text, else these sides one by one.
WIDTH_FROM, HEIGHT_FROM = ("width",), ("height",)
#: Each reference role.
REFERENCE_SOURCES = {
    "single": ("config.image", "metadata.reference_image_url", "reference_image_url"),
    "start": ("config.first_frame", "metadata.start_reference_url", "first_frame"),
    "end": ("config.last_frame", "metadata.end_reference_url", "last_frame"),
}
MODE_FIELDS = (
    "config.video_reference_mode",
    "config.reference_mode",
    "metadata.video_reference_mode",
    "metadata.reference_mode",
    "reference_mode",
)
DENOISE_FROM = ("config.denoise_strength", "metadata.denoise_strength", "denoise_strength")
REFERENCE_STRENGTH_FROM = ("metadata.reference_strength", "reference_strength")
#: `pipeline` values that ask for image to image (compared without case, '-', '_' or spaces).
IMAGE_TO_IMAGE_NAMES = frozenset({"img2img", "i2i", "image2image", "imagetoimage"})
#: I2I strength when the job names none; `exact_copy_mode` caps strength and guidance.
DEFAULT_DENOISE_STRENGTH = 0.5
EXACT_COPY_MAX_STRENGTH, EXACT_COPY_MAX_GUIDANCE = 0.05, 1.0


@dataclass(frozen=True)
class Preset:
    """Steps and guidance of a quality level."""

    steps: int
    guidance: float


PresetName = Literal["fast", "balanced", "high"]
PRESETS: dict[PresetName, Preset] = {
    "fast": Preset(steps=25, guidance=6.5),
    "balanced": Preset(steps=35, guidance=7.0),
    "high": Preset(steps=50, guidance=7.5),
}
#: Out of GPU memory at one preset, generation runs again at the next one (CONTRACT.md §2).
DEGRADATION_ORDER: tuple[PresetName, ...] = ("high", "balanced", "fast")


class JobType(StrEnum):
    """The eight job types the platform sends (CONTRACT.md section 2)."""

    image_fast = "image_fast"
    image_high = "image_high"
    video_fast = "video_fast"
    video_high = "video_high"
    image7b_fast_enhanced = "image7b_fast_enhanced"
    image7b_high_enhanced = "image7b_high_enhanced"
    video7b_fast_enhanced = "video7b_fast_enhanced"
    video7b_high_enhanced = "video7b_high_enhanced"

    @property
    def is_video(self) -> bool:
        return self.value.startswith("video")

    @property
    def enhanced(self) -> bool:
        return self.value.endswith("_enhanced")

    @property
    def content_type(self) -> Literal["video", "image"]:
        return "video" if self.is_video else "image"

    @property
    def quality(self) -> Literal["fast", "high"]:
        return "high" if "_high" in self.value else "fast"

    @property
    def default_frames(self) -> int:
        """What the platform asks for: 83 for video (81 after normalisation), 1 for images."""
        return 83 if self.is_video else 1


class Segment(BaseModel):
    """One scene of a storyboard (`config.segments`): its prompt, the seconds asked for and
    the frames it adds to the video (the first segment 4n+1, every later one a multiple of
    4, so each continues from the last frames of the one before)."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    seconds: float
    frames: int


def presets_from(quality: PresetName) -> tuple[PresetName, ...]:
    """The preset a job runs at, then each lower one it may fall back to, in order."""
    return DEGRADATION_ORDER[DEGRADATION_ORDER.index(quality) :]


class Job(BaseModel):
    """One validated job, everything the stages need; stored in the job record as JSON."""

    model_config = ConfigDict(frozen=True)

    id: str
    user_id: str
    type: JobType
    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    #: The quality preset the job runs at: its `quality`, else its type's.
    quality: PresetName
    steps: int
    guidance: float
    #: Steps and guidance that do not follow the preset: the job's own (config), or exact
    #: copy's guidance cap. They are kept when generation falls back to a lower preset.
    own_steps: int | None = None
    own_guidance: float | None = None
    #: Runs on the distilled checkpoint (its steps, guidance 1.0): see generation/speed.py.
    turbo: bool = False
    shift: float = DEFAULT_SHIFT
    width: int = DEFAULT_WIDTH_PX
    height: int = DEFAULT_HEIGHT_PX
    #: Frames of the video (4n+1): up to FRAMES_MAX in one pass, up to LONG_FRAMES_MAX by
    #: continuation windows (worker/generation/windows.py).
    frames: int
    frames_requested: int
    #: `config.duration_seconds` as asked (it decided `frames`), if given.
    duration_seconds: float | None = None
    #: A storyboard: its scenes in order (their frames add up to `frames`); empty otherwise.
    segments: tuple[Segment, ...] = ()
    #: What the callback says about how the length was read (a value the segments overrode).
    length_notes: dict[str, str] = {}
    #: The MP4's frame rate: `duration_seconds` is frames / fps.
    fps: int = FPS
    enhance: bool
    #: The mode the references present decide (see `_references`); "none" without any.
    reference_mode: ReferenceMode = "none"
    #: The references this job uses, by role (single, start, end).
    reference_urls: dict[str, str] = {}
    image_to_image: bool = False
    denoise_strength: float | None = None
    #: What the callback says about how the references were read (conflicts, ignored ones).
    reference_notes: dict[str, Any] = {}
    video_id: str | None = None
    image_id: str | None = None
    metadata: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _quality_of_older_records(cls, data: Any) -> Any:
        """A job recorded before `quality` was kept runs at its type's preset."""
        if isinstance(data, dict) and "quality" not in data and "type" in data:
            return data | {"quality": JobType(data["type"]).quality}
        return data

    @property
    def content_type(self) -> Literal["video", "image"]:
        return self.type.content_type

    def at_preset(self, quality: PresetName) -> Job:
        """This job run at another preset: its steps and guidance, unless it named its own."""
        preset = PRESETS[quality]
        return self.model_copy(
            update={
                "quality": quality,
                "steps": preset.steps if self.own_steps is None else self.own_steps,
                "guidance": preset.guidance if self.own_guidance is None else self.own_guidance,
            }
        )

    @property
    def extension(self) -> str:
        return "mp4" if self.type.is_video else "png"

    @property
    def asset_key(self) -> str:
        """Storage path of the result, from the job alone: a retry overwrites, never duplicates."""
        return f"{self.user_id}/{self.id}/0.{self.extension}"

    @property
    def thumbnail_key(self) -> str:
        return f"{self.user_id}/{self.id}/0.thumb.webp"


def decode_body(raw: bytes | str) -> dict[str, Any]:
    """Accept both body shapes of the platform list: an object, or `["<object as JSON>"]`.

    Any valid JSON decodes, whatever its values (`worker.jobs.any_json`), so a body with a
    usable id can always be answered. Bytes must be UTF-8 (json.loads would also guess
    UTF-16 or UTF-32, text the record could not keep).
    """
    try:
        body = any_json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        if isinstance(body, list) and len(body) == 1 and isinstance(body[0], str):
            body = any_json.loads(body[0])
    except ValueError as e:
        raise InvalidJob("body", f"not valid UTF-8 JSON: {e}") from e
    if not isinstance(body, dict):
        raise InvalidJob("body", "expected a JSON object or a one-element array holding one")
    return body


def job_id_of(body: dict[str, Any]) -> str | None:
    """The job id if the body carries a usable one, so even a bad job can be answered."""
    job_id = body.get("id") or body.get("job_id")
    if isinstance(job_id, str) and SAFE_ID.fullmatch(job_id):
        return job_id
    return None


def job_type_of(body: dict[str, Any]) -> str:
    """The type a body names, for the record and `failed` callback of a job refused before
    it was parsed: text as sent when it can be kept, else empty."""
    name = body.get("type") or body.get("job_type")
    if isinstance(name, str) and len(name) <= TYPE_NAME_MAX_CHARS and _is_text(name):
        return name
    return ""


def parse_job(body: dict[str, Any]) -> Job:
    """Validate one decoded body into a Job; raise InvalidJob naming the field and the limit."""
    config = _object(body, "config")
    metadata = _object(body, "metadata")

    job_id = body.get("id") or body.get("job_id")
    if not job_id:
        raise InvalidJob("id", "is required")
    _check_safe_id("id", job_id)
    user_id = body.get("user_id")
    if not user_id:
        raise InvalidJob("user_id", "is required")
    _check_safe_id("user_id", user_id)
    field, target = _given(body, TARGET_WORKER_FROM)
    if target is not None and target != TARGET_WORKER:
        raise InvalidJob(
            field, f"this worker is {TARGET_WORKER!r}, the job is for {_shown(target)}"
        )

    job_type = _job_type(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidJob("prompt", "is required and must be non-empty text")
    if len(prompt) > PROMPT_MAX_CHARS:
        raise InvalidJob(
            "prompt", f"{len(prompt)} characters is over the limit of {PROMPT_MAX_CHARS}"
        )
    _check_text("prompt", prompt)
    negative_prompt = body.get("negative_prompt")
    if negative_prompt is None:
        negative_prompt = ""
    if not isinstance(negative_prompt, str):
        raise InvalidJob("negative_prompt", f"must be text, got {_shown(negative_prompt)}")
    if len(negative_prompt) > PROMPT_MAX_CHARS:
        raise InvalidJob(
            "negative_prompt",
            f"{len(negative_prompt)} characters is over the limit of {PROMPT_MAX_CHARS}",
        )
    _check_text("negative_prompt", negative_prompt)

    quality = _quality(body, job_type)
    preset = PRESETS[quality]
    steps = _int_in(body, STEPS_FROM, STEPS_MIN, STEPS_MAX)
    own_guidance = _float_in(body, GUIDANCE_FROM, GUIDANCE_MIN, GUIDANCE_MAX)
    shift = _float_in(body, SHIFT_FROM, SHIFT_MIN, SHIFT_MAX)
    width, height = _size(body, config)
    fps = _int_in(body, FPS_FROM, FPS_MIN, FPS_MAX)
    length = _length(body, job_type, fps if fps is not None else FPS)
    references = _references(body, config, metadata)
    if references.image_to_image and length.frames > FRAMES_MAX:
        raise InvalidJob(
            length.field,
            f"image to image runs in one pass of at most {FRAMES_MAX} frames, got {length.frames}",
        )
    guidance = own_guidance if own_guidance is not None else preset.guidance
    if references.exact_copy:
        references.notes["exact_copy_mode"] = True
        if guidance > EXACT_COPY_MAX_GUIDANCE:
            references.notes["exact_copy_guidance_clamped_from"] = guidance
            guidance = own_guidance = EXACT_COPY_MAX_GUIDANCE
    _check_keepable("metadata", metadata)

    return Job(
        id=job_id,
        user_id=user_id,
        type=job_type,
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=_seed(config),
        quality=quality,
        steps=steps if steps is not None else preset.steps,
        guidance=guidance,
        own_steps=steps,
        own_guidance=own_guidance,
        shift=shift if shift is not None else DEFAULT_SHIFT,
        width=width,
        height=height,
        frames=length.frames,
        frames_requested=length.requested,
        duration_seconds=length.seconds,
        segments=length.segments,
        length_notes=length.notes,
        fps=fps if fps is not None else FPS,
        enhance=_enhance(config, job_type),
        reference_mode=references.mode,
        reference_urls=references.urls,
        image_to_image=references.image_to_image,
        denoise_strength=references.strength,
        reference_notes=references.notes,
        video_id=_optional_str(body, "video_id"),
        image_id=_optional_str(body, "image_id"),
        metadata=metadata,
    )


def normalise_frames(frames: int) -> int:
    """WAN makes 4n+1 frames: round down to the nearest such count (83 -> 81)."""
    return (frames - 1) // 4 * 4 + 1


def frames_of_seconds(seconds: float, fps: int) -> tuple[int, int]:
    """(frames asked for, frames made) for a duration: round(seconds x fps), then the
    nearest 4n+1 (160 -> 161: 10 s at 16 fps; a tie goes down, as for `frame_num`)."""
    asked = round(seconds * fps)
    below = normalise_frames(max(asked, 1))
    return asked, below + 4 if asked - below > 2 else below


@dataclass
class _Length:
    """How long the video is, and where that was read."""

    frames: int
    requested: int
    #: The field that decided it, for errors about it.
    field: str
    seconds: float | None = None
    segments: tuple[Segment, ...] = ()
    notes: dict[str, str] = dataclass_field(default_factory=dict)


def _length(body: dict[str, Any], job_type: JobType, fps: int) -> _Length:
    """The frames a job makes: a storyboard's segments, else `duration_seconds` (which wins
    over `frame_num`), else `frame_num`, else the type's default. Up to LONG_FRAMES_MAX for
    a video, 1 for an image; the request is kept and the 4n+1 count reported."""
    given_frames, frames = _given(body, FRAMES_FROM)
    given_seconds, _ = _given(body, DURATION_FROM)
    given_segments, _ = _given(body, SEGMENTS_FROM)
    if not job_type.is_video and (given_segments or given_seconds):
        raise InvalidJob(
            given_segments or given_seconds, "image jobs make 1 frame: no duration or storyboard"
        )
    if given_segments:
        length = _storyboard(body, fps)
        overridden = [f for f in (given_seconds, given_frames) if f]
        if overridden:
            length.notes["length_note"] = (
                f"the storyboard's segments decide the length: {', '.join(overridden)} ignored"
            )
        return length
    if given_seconds:
        seconds = _seconds(given_seconds, _given(body, DURATION_FROM)[1], fps)
        asked, made = frames_of_seconds(seconds, fps)
        if asked < 1:
            raise InvalidJob(given_seconds, f"{seconds:g} s at {fps} fps is under one frame")
        return _Length(made, asked, given_seconds, seconds=seconds)
    frames = _int_in(body, FRAMES_FROM, FRAMES_MIN, LONG_FRAMES_MAX)
    if frames is None:
        return _Length(normalise_frames(job_type.default_frames), job_type.default_frames, "")
    if not job_type.is_video and frames != 1:
        raise InvalidJob(given_frames, f"image jobs make 1 frame, got {frames}")
    return _Length(normalise_frames(frames), frames, given_frames)


def _seconds(field: str, value: Any, fps: int) -> float:
    """A number of seconds above 0 that makes at most LONG_FRAMES_MAX frames at `fps`
    (checked before any rounding: 1e308 s would overflow it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise InvalidJob(field, f"must be a number of seconds above 0, got {_shown(value)}")
    if value * fps > LONG_FRAMES_MAX + 2:  # the nearest 4n+1 of 963 is still 961
        raise InvalidJob(
            field,
            f"{_shown(value)} s at {fps} fps is over the limit of {LONG_FRAMES_MAX} frames "
            f"(about {LONG_FRAMES_MAX // fps} s at {fps} fps)",
        )
    return float(value)


def _storyboard(body: dict[str, Any], fps: int) -> _Length:
    """`config.segments`: a list of `{prompt, seconds}`, each prompt within the prompt
    limit; the first segment makes 4n+1 frames, each later one a multiple of 4 (at least 4),
    and all of them together at most LONG_FRAMES_MAX."""
    field, items = _given(body, SEGMENTS_FROM)
    if not isinstance(items, list) or not items:
        raise InvalidJob(field, "must be a non-empty list of {prompt, seconds} objects")
    segments: list[Segment] = []
    asked_in_all = made_in_all = 0
    for index, item in enumerate(items):
        where = f"{field}[{index}]"
        if not isinstance(item, dict):
            raise InvalidJob(where, f"must be an object {{prompt, seconds}}, got {_shown(item)}")
        prompt = item.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidJob(f"{where}.prompt", "is required and must be non-empty text")
        if len(prompt) > PROMPT_MAX_CHARS:
            raise InvalidJob(
                f"{where}.prompt",
                f"{len(prompt)} characters is over the limit of {PROMPT_MAX_CHARS}",
            )
        _check_text(f"{where}.prompt", prompt)
        seconds = _seconds(f"{where}.seconds", item.get("seconds"), fps)
        asked = round(seconds * fps)
        if index == 0:
            made = frames_of_seconds(seconds, fps)[1]
        else:
            made = max(4, 4 * round(asked / 4))
        asked_in_all, made_in_all = asked_in_all + asked, made_in_all + made
        if made_in_all > LONG_FRAMES_MAX:
            raise InvalidJob(
                field,
                f"the segments up to [{index}] at {fps} fps are {made_in_all} frames, over the "
                f"limit of {LONG_FRAMES_MAX} (about {LONG_FRAMES_MAX // fps} s at {fps} fps)",
            )
        segments.append(Segment(prompt=prompt, seconds=seconds, frames=made))
    seconds_in_all = sum(segment.seconds for segment in segments)
    return _Length(made_in_all, asked_in_all, field, seconds=seconds_in_all,
                   segments=tuple(segments))  # fmt: skip


#: How an error message quotes a value the job sent: cut short, since a body may hold
#: megabytes of text, integers of thousands of digits or deep nesting.
_SHOWN = reprlib.Repr()
_SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong, _SHOWN.maxlevel = 80, 80, 40, 3


def _shown(value: Any) -> str:
    return _SHOWN.repr(value)


def _given(
    body: dict[str, Any], places: tuple[str, ...], *, blank: bool = False
) -> tuple[str, Any]:
    """The first of `places` that gives a value (a `null` gives none; with `blank`, an
    empty text neither), and where it was: `config.x` and `metadata.x` inside those
    objects, a bare name at the top level."""
    for place in places:
        section, _, name = place.rpartition(".")
        holder = body.get(section) if section else body
        value = holder.get(name) if isinstance(holder, dict) else None
        if value is not None and not (blank and value == ""):
            return place, value
    return "", None


def _is_text(value: str) -> bool:
    """Whether UTF-8 can carry it: JSON's `\\ud800` escapes decode to lone surrogates."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check_text(field: str, value: str) -> None:
    if not _is_text(value):
        at = next(i for i, char in enumerate(value) if 0xD800 <= ord(char) <= 0xDFFF)
        raise InvalidJob(
            field,
            f"holds a lone surrogate (\\u{ord(value[at]):04x} at character {at}), "
            "which is not text: the record and the callback could not carry it",
        )


def _check_keepable(field: str, value: Any) -> None:
    """A value kept as sent (metadata) must survive the record's JSON: text UTF-8 can
    carry, finite numbers, and at most METADATA_DEPTH_MAX levels of nesting."""
    pending: list[tuple[str, Any, int]] = [(field, value, 0)]
    while pending:
        field, value, depth = pending.pop()
        if isinstance(value, Unreadable):
            raise InvalidJob(field, f"holds {value.what}, more than the record can keep")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidJob(field, f"{value} is not a finite number")
        if isinstance(value, str):
            _check_text(field, value)
        if isinstance(value, (dict, list)):
            if depth == METADATA_DEPTH_MAX:
                raise InvalidJob(field, f"is nested deeper than {METADATA_DEPTH_MAX} levels")
            pending.extend(
                (_item_field(field, key), item, depth + 1) for key, item in _items(value)
            )


def _items(container: dict[str, Any] | list[Any]) -> Iterator[tuple[str | int, Any]]:
    return iter(container.items()) if isinstance(container, dict) else enumerate(container)


def _item_field(field: str, key: str | int) -> str:
    """How an error names an item: `metadata.key`, `metadata[3]` or `metadata['odd key']`."""
    if isinstance(key, str) and PLAIN_KEY.fullmatch(key):
        return f"{field}.{key}"
    if isinstance(key, str) and not _is_text(key):
        raise InvalidJob(f"{field}[{_shown(key)}]", "a key holds a lone surrogate")
    return f"{field}[{_shown(key)}]"


def _object(body: dict[str, Any], name: str) -> dict[str, Any]:
    """An optional object field: absent or null is empty; anything else must be an object."""
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidJob(name, f"must be a JSON object, got {type(value).__name__}")
    return value


def _check_safe_id(field: str, value: Any) -> None:
    if not isinstance(value, str) or not SAFE_ID.fullmatch(value):
        raise InvalidJob(
            field,
            f"must be 1-128 letters, digits, '-' or '_' (it becomes a storage path), "
            f"got {_shown(value)}",
        )


def _job_type(body: dict[str, Any]) -> JobType:
    name = body.get("type") or body.get("job_type")
    if not name:
        raise InvalidJob("type", "is required")
    if not isinstance(name, str):
        raise InvalidJob("type", f"must be text, got {_shown(name)}")
    try:
        return JobType(name.removeprefix("wan_"))
    except ValueError:
        known = ", ".join(t.value for t in JobType)
        raise InvalidJob(
            "type", f"unknown job type {_shown(name.removeprefix('wan_'))}; known: {known}"
        ) from None


def _quality(body: dict[str, Any], job_type: JobType) -> PresetName:
    """A named `quality` overrides the type's preset; config values override both."""
    field, quality = _given(body, QUALITY_FROM)
    if quality is None:
        return job_type.quality
    if not isinstance(quality, str) or quality not in PRESETS:
        raise InvalidJob(field, f"unknown preset {_shown(quality)}; known: {', '.join(PRESETS)}")
    return quality  # type: ignore[return-value]  # one of PRESETS' keys


def _int_in(body: dict[str, Any], places: tuple[str, ...], low: int, high: int) -> int | None:
    field, value = _given(body, places)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise InvalidJob(field, f"must be a whole number, got {_shown(value)}")
    if not low <= value <= high:
        raise InvalidJob(field, f"{_shown(value)} is outside the allowed range {low}..{high}")
    return int(value)


def _float_in(
    body: dict[str, Any], places: tuple[str, ...], low: float, high: float
) -> float | None:
    field, value = _given(body, places)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidJob(field, f"must be a number, got {_shown(value)}")
    if not low <= value <= high:
        raise InvalidJob(field, f"{_shown(value)} is outside the allowed range {low:g}..{high:g}")
    return float(value)


def _size(body: dict[str, Any], config: dict[str, Any]) -> tuple[int, int]:
    """`resolution` 'WxH' (newer) or `size` 'W*H' (older); each side checked on its own.
    Without either, the top-level `width` and `height`, each defaulting on its own."""
    if config.get("resolution") is not None:
        field, text, separator = "config.resolution", config["resolution"], "x"
    elif config.get("size") is not None:
        field, text, separator = "config.size", config["size"], "*"
    else:
        return (
            _side(body, WIDTH_FROM, DEFAULT_WIDTH_PX),
            _side(body, HEIGHT_FROM, DEFAULT_HEIGHT_PX),
        )
    match = SIZE_PATTERN.fullmatch(text.lower()) if isinstance(text, str) else None
    if match is None or match[2] != separator:
        raise InvalidJob(
            field, f"expected WIDTH{separator}HEIGHT in digits 0-9, got {_shown(text)}"
        )
    width, height = int(match[1]), int(match[3])
    for side, value in (("width", width), ("height", height)):
        if not SIZE_MIN_PX <= value <= SIZE_MAX_PX:
            raise InvalidJob(
                field, f"{side} {value} is outside the allowed range {SIZE_MIN_PX}..{SIZE_MAX_PX}"
            )
        if value % SIZE_STEP_PX:
            raise InvalidJob(field, f"{side} {value} is not a multiple of {SIZE_STEP_PX}")
    return width, height


def _side(body: dict[str, Any], places: tuple[str, ...], default: int) -> int:
    """One side of the size given on its own (the frontend's `width`, `height`)."""
    value = _int_in(body, places, SIZE_MIN_PX, SIZE_MAX_PX)
    if value is None:
        return default
    if value % SIZE_STEP_PX:
        raise InvalidJob(_given(body, places)[0], f"{value} is not a multiple of {SIZE_STEP_PX}")
    return value


def _seed(config: dict[str, Any]) -> int | None:
    """None (or -1) asks for a random seed, chosen and reported by generation."""
    seed = config.get("seed")
    if seed is None or seed == -1:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise InvalidJob(
            "config.seed", f"must be a whole number in 0..{SEED_MAX} or -1, got {_shown(seed)}"
        )
    return seed


def _enhance(config: dict[str, Any], job_type: JobType) -> bool:
    """A JSON boolean only: the string "false" would be truthy, so text is refused, not guessed."""
    requested = config.get("enhance_prompt")
    if requested is None:
        return job_type.enhanced
    if not isinstance(requested, bool):
        raise InvalidJob("config.enhance_prompt", f"must be true or false, got {_shown(requested)}")
    return requested


@dataclass
class _References:
    mode: ReferenceMode
    urls: dict[str, str]
    image_to_image: bool
    strength: float | None
    exact_copy: bool
    notes: dict[str, Any]


def _references(
    body: dict[str, Any], config: dict[str, Any], metadata: dict[str, Any]
) -> _References:
    """Which references a job uses, and how: CONTRACT.md section 1 plus one rule for conflicts.

    The rule: the references present decide, a mode field never drops one. Start and end
    give `both`, start alone `start`, end alone `end`, an image alone `single`; an image
    beside start/end frames is used too (as VACE's reference image). A mode field (config,
    then metadata, then top level) that names another mode is reported in
    `reference_mode_note` and otherwise ignored. Image to image, asked for by a `pipeline`
    naming img2img/i2i, a denoise/reference strength or `exact_copy_mode` with a reference,
    uses one source image (the image, else the start frame, else the end frame); the others
    are reported in `references_ignored`.
    """
    urls: dict[str, str] = {}
    for role, places in REFERENCE_SOURCES.items():
        field, url = _given(body, places, blank=True)
        if url is None:
            continue
        if not isinstance(url, str):
            raise InvalidJob(field, f"must be a URL string, got {_shown(url)}")
        _check_text(field, url)
        urls[role] = url
    strength = _denoise_strength(body)
    exact_copy = _flag(config, metadata, "exact_copy_mode")
    notes: dict[str, Any] = {}
    image_to_image = bool(urls) and (
        _names_image_to_image(config, metadata) or strength is not None or exact_copy
    )
    if image_to_image:
        source = next(role for role in ("single", "start", "end") if role in urls)
        notes["references_ignored"] = {
            role: f"image to image uses one source image, the {source} reference"
            for role in urls
            if role != source
        } or None
        urls = {source: urls[source]}
        mode: ReferenceMode = "single" if source == "single" else source
        if strength is None:
            strength = DEFAULT_DENOISE_STRENGTH
        if exact_copy and strength > EXACT_COPY_MAX_STRENGTH:
            notes["exact_copy_strength_clamped_from"] = strength
            strength = EXACT_COPY_MAX_STRENGTH
    elif "start" in urls and "end" in urls:
        mode = "both"
    else:
        mode = next((role for role in ("start", "end", "single") if role in urls), "none")
    if not urls and _names_image_to_image(config, metadata):
        notes["image_to_image_note"] = "image to image was asked for without a reference image"
    field, requested = _given(body, MODE_FIELDS)
    if requested is not None and requested not in REFERENCE_MODES:
        raise InvalidJob(
            field, f"unknown mode {_shown(requested)}; known: {', '.join(REFERENCE_MODES)}"
        )
    if requested is not None and requested != mode:
        present = ", ".join(urls) or "none"
        notes["reference_mode_note"] = (
            f"{field} {requested!r} disagrees with the references sent ({present}): "
            f"the references decide, mode {mode!r}"
        )
    notes = {name: value for name, value in notes.items() if value is not None}
    return _References(mode, urls, image_to_image, strength, exact_copy and image_to_image, notes)


def _names_image_to_image(config: dict[str, Any], metadata: dict[str, Any]) -> bool:
    value = config.get("pipeline") or metadata.get("pipeline")
    if not isinstance(value, str):
        return False
    return re.sub(r"[\s_-]", "", value.lower()) in IMAGE_TO_IMAGE_NAMES


def _flag(config: dict[str, Any], metadata: dict[str, Any], name: str) -> bool:
    value = config.get(name)
    return bool(metadata.get(name) if value is None else value)


def _denoise_strength(body: dict[str, Any]) -> float | None:
    """I2I strength as the job states it: `denoise_strength`, else 1 - `reference_strength`."""
    strength = _fraction(body, DENOISE_FROM)
    if strength is None:
        reference = _fraction(body, REFERENCE_STRENGTH_FROM)
        strength = None if reference is None else 1 - reference
    return strength


def _fraction(body: dict[str, Any], places: tuple[str, ...]) -> float | None:
    """A number in 0..1 from the first place that gives one."""
    field, value = _given(body, places)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise InvalidJob(field, f"must be a number in 0..1, got {_shown(value)}")
    return float(value)


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    """An optional text field, kept as sent: an object or number is refused, not stringified."""
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidJob(name, f"must be text, got {type(value).__name__} {_shown(value)}")
    if value is not None:
        _check_text(name, value)
    return value
