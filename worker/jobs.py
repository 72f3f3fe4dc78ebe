"""The job model: the platform's two body shapes and two generations of names in, one typed job out.

CONTRACT.md sections 1, 2 and 5 are the specification. Every check names the field the
platform sent and the limit it broke, so a `failed` callback tells the user what to fix.

References follow one rule: the references present decide the mode, and a mode field
(`reference_mode`, `video_reference_mode`, config before metadata) that names another mode
is ignored and reported in the callback's `reference_mode_note`; see `_references`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from worker.errors import InvalidJob

#: Job ids and user ids become parts of Redis keys and storage paths: only these characters,
#: matched against the whole string (`fullmatch`: `$` would let a trailing newline through).
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
#: `WIDTHxHEIGHT` / `WIDTH*HEIGHT` with ASCII digits only (`\d` would take any script's digits).
SIZE_PATTERN = re.compile(r"\s*([0-9]+)\s*([x*])\s*([0-9]+)\s*")
#: Supabase Storage bucket the platform reads results from.
BUCKET = "workspace-temp"
#: Frames per second of every video.
FPS = 16
#: The model every job type uses, as the platform names it in callbacks.
WAN_TASK = "t2v-1.3B"

FRAMES_MIN, FRAMES_MAX = 1, 121
SIZE_MIN_PX, SIZE_MAX_PX, SIZE_STEP_PX = 256, 1280, 16
STEPS_MIN, STEPS_MAX = 1, 100
GUIDANCE_MIN, GUIDANCE_MAX = 0.0, 20.0
SHIFT_MIN, SHIFT_MAX = 0.0, 20.0
PROMPT_MAX_CHARS = 2_000
SEED_MAX = 2**32 - 1
DEFAULT_WIDTH_PX, DEFAULT_HEIGHT_PX = 480, 832
DEFAULT_SHIFT = 5.0

ReferenceMode = Literal["none", "single", "start", "end", "both"]
REFERENCE_MODES: tuple[ReferenceMode, ...] = ("none", "single", "start", "end", "both")
#: Where each reference role comes from, `config` name first (CONTRACT.md section 1).
REFERENCE_SOURCES = {
    "single": ("image", "reference_image_url"),
    "start": ("first_frame", "start_reference_url"),
    "end": ("last_frame", "end_reference_url"),
}
#: Mode fields, in the order they are read (config before metadata).
MODE_FIELDS = (
    ("config", "video_reference_mode"),
    ("config", "reference_mode"),
    ("metadata", "video_reference_mode"),
    ("metadata", "reference_mode"),
)
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
    frames: int
    frames_requested: int
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

    Bytes must be UTF-8 (json.loads would also guess UTF-16 or UTF-32, text the record
    could not keep). ValueError covers bad JSON, bad UTF-8 and integers over Python's
    4,300-digit conversion limit; RecursionError covers too deep nesting.
    """
    try:
        body = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        if isinstance(body, list) and len(body) == 1 and isinstance(body[0], str):
            body = json.loads(body[0])
    except (ValueError, RecursionError) as e:
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

    job_type = _job_type(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidJob("prompt", "is required and must be non-empty text")
    if len(prompt) > PROMPT_MAX_CHARS:
        raise InvalidJob(
            "prompt", f"{len(prompt)} characters is over the limit of {PROMPT_MAX_CHARS}"
        )
    negative_prompt = body.get("negative_prompt")
    if negative_prompt is None:
        negative_prompt = ""
    if not isinstance(negative_prompt, str):
        raise InvalidJob("negative_prompt", f"must be text, got {negative_prompt!r:.80}")
    if len(negative_prompt) > PROMPT_MAX_CHARS:
        raise InvalidJob(
            "negative_prompt",
            f"{len(negative_prompt)} characters is over the limit of {PROMPT_MAX_CHARS}",
        )

    quality = _quality(body, job_type)
    preset = PRESETS[quality]
    steps = _int_in(config, ("num_inference_steps", "sample_steps"), STEPS_MIN, STEPS_MAX)
    own_guidance = _float_in(
        config, ("guidance_scale", "sample_guide_scale"), GUIDANCE_MIN, GUIDANCE_MAX
    )
    shift = _float_in(config, ("sample_shift",), SHIFT_MIN, SHIFT_MAX)
    width, height = _size(config)
    frames_requested = _int_in(config, ("frame_num",), FRAMES_MIN, FRAMES_MAX)
    if frames_requested is None:
        frames_requested = job_type.default_frames
    elif not job_type.is_video and frames_requested != 1:
        raise InvalidJob("config.frame_num", f"image jobs make 1 frame, got {frames_requested}")
    references = _references(config, metadata)
    guidance = own_guidance if own_guidance is not None else preset.guidance
    if references.exact_copy:
        references.notes["exact_copy_mode"] = True
        if guidance > EXACT_COPY_MAX_GUIDANCE:
            references.notes["exact_copy_guidance_clamped_from"] = guidance
            guidance = own_guidance = EXACT_COPY_MAX_GUIDANCE

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
        frames=normalise_frames(frames_requested),
        frames_requested=frames_requested,
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
            f"got {value!r:.80}",
        )


def _job_type(body: dict[str, Any]) -> JobType:
    name = body.get("type") or body.get("job_type")
    if not name:
        raise InvalidJob("type", "is required")
    name = str(name).removeprefix("wan_")
    try:
        return JobType(name)
    except ValueError:
        known = ", ".join(t.value for t in JobType)
        raise InvalidJob("type", f"unknown job type {name!r}; known: {known}") from None


def _quality(body: dict[str, Any], job_type: JobType) -> PresetName:
    """A named `quality` overrides the type's preset; config values override both."""
    quality = body.get("quality")
    if quality is None:
        return job_type.quality
    if not isinstance(quality, str) or quality not in PRESETS:
        raise InvalidJob("quality", f"unknown preset {quality!r}; known: {', '.join(PRESETS)}")
    return quality  # type: ignore[return-value]  # one of PRESETS' keys


def _first(config: dict[str, Any], names: tuple[str, ...]) -> tuple[str, Any]:
    """The first of the (newer, older) names that is set, with its field path for errors."""
    for name in names:
        if config.get(name) is not None:
            return f"config.{name}", config[name]
    return "", None


def _int_in(config: dict[str, Any], names: tuple[str, ...], low: int, high: int) -> int | None:
    field, value = _first(config, names)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise InvalidJob(field, f"must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise InvalidJob(field, f"{value} is outside the allowed range {low}..{high}")
    return int(value)


def _float_in(
    config: dict[str, Any], names: tuple[str, ...], low: float, high: float
) -> float | None:
    field, value = _first(config, names)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidJob(field, f"must be a number, got {value!r}")
    if not low <= value <= high:
        raise InvalidJob(field, f"{value} is outside the allowed range {low:g}..{high:g}")
    return float(value)


def _size(config: dict[str, Any]) -> tuple[int, int]:
    """`resolution` 'WxH' (newer) or `size` 'W*H' (older); each side checked on its own."""
    if config.get("resolution") is not None:
        field, text, separator = "config.resolution", config["resolution"], "x"
    elif config.get("size") is not None:
        field, text, separator = "config.size", config["size"], "*"
    else:
        return DEFAULT_WIDTH_PX, DEFAULT_HEIGHT_PX
    match = SIZE_PATTERN.fullmatch(text.lower()) if isinstance(text, str) else None
    if match is None or match[2] != separator:
        raise InvalidJob(field, f"expected WIDTH{separator}HEIGHT in digits 0-9, got {text!r:.80}")
    width, height = int(match[1]), int(match[3])
    for side, value in (("width", width), ("height", height)):
        if not SIZE_MIN_PX <= value <= SIZE_MAX_PX:
            raise InvalidJob(
                field, f"{side} {value} is outside the allowed range {SIZE_MIN_PX}..{SIZE_MAX_PX}"
            )
        if value % SIZE_STEP_PX:
            raise InvalidJob(field, f"{side} {value} is not a multiple of {SIZE_STEP_PX}")
    return width, height


def _seed(config: dict[str, Any]) -> int | None:
    """None (or -1) asks for a random seed, chosen and reported by generation."""
    seed = config.get("seed")
    if seed is None or seed == -1:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise InvalidJob(
            "config.seed", f"must be a whole number in 0..{SEED_MAX} or -1, got {seed!r}"
        )
    return seed


def _enhance(config: dict[str, Any], job_type: JobType) -> bool:
    """A JSON boolean only: the string "false" would be truthy, so text is refused, not guessed."""
    requested = config.get("enhance_prompt")
    if requested is None:
        return job_type.enhanced
    if not isinstance(requested, bool):
        raise InvalidJob("config.enhance_prompt", f"must be true or false, got {requested!r:.80}")
    return requested


@dataclass
class _References:
    mode: ReferenceMode
    urls: dict[str, str]
    image_to_image: bool
    strength: float | None
    exact_copy: bool
    notes: dict[str, Any]


def _references(config: dict[str, Any], metadata: dict[str, Any]) -> _References:
    """Which references a job uses, and how: CONTRACT.md section 1 plus one rule for conflicts.

    The rule: the references present decide, a mode field never drops one. Start and end
    give `both`, start alone `start`, end alone `end`, an image alone `single`; an image
    beside start/end frames is used too (as VACE's reference image). A mode field (config,
    then metadata) that names another mode is reported in `reference_mode_note` and
    otherwise ignored. Image to image, asked for by a `pipeline` naming img2img/i2i, a
    denoise/reference strength or `exact_copy_mode` with a reference, uses one source image
    (the image, else the start frame, else the end frame); the others are reported in
    `references_ignored`.
    """
    urls: dict[str, str] = {}
    for role, (config_name, metadata_name) in REFERENCE_SOURCES.items():
        url = config.get(config_name) or metadata.get(metadata_name)
        if url and not isinstance(url, str):
            raise InvalidJob(f"reference {role}", f"must be a URL string, got {url!r}")
        if url:
            urls[role] = url
    strength = _denoise_strength(config, metadata)
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
    field, requested = _mode_field(config, metadata)
    if requested is not None and requested != mode:
        present = ", ".join(urls) or "none"
        notes["reference_mode_note"] = (
            f"{field} {requested!r} disagrees with the references sent ({present}): "
            f"the references decide, mode {mode!r}"
        )
    notes = {name: value for name, value in notes.items() if value is not None}
    return _References(mode, urls, image_to_image, strength, exact_copy and image_to_image, notes)


def _mode_field(config: dict[str, Any], metadata: dict[str, Any]) -> tuple[str, str | None]:
    for where, name in MODE_FIELDS:
        value = (config if where == "config" else metadata).get(name)
        if value is not None:
            if value not in REFERENCE_MODES:
                raise InvalidJob(
                    f"{where}.{name}",
                    f"unknown mode {value!r}; known: {', '.join(REFERENCE_MODES)}",
                )
            return f"{where}.{name}", value
    return "", None


def _names_image_to_image(config: dict[str, Any], metadata: dict[str, Any]) -> bool:
    value = config.get("pipeline") or metadata.get("pipeline")
    if not isinstance(value, str):
        return False
    return re.sub(r"[\s_-]", "", value.lower()) in IMAGE_TO_IMAGE_NAMES


def _flag(config: dict[str, Any], metadata: dict[str, Any], name: str) -> bool:
    value = config.get(name)
    return bool(metadata.get(name) if value is None else value)


def _denoise_strength(config: dict[str, Any], metadata: dict[str, Any]) -> float | None:
    """I2I strength as the job states it: `denoise_strength`, else 1 - `reference_strength`."""
    strength = config.get("denoise_strength")
    if strength is None:
        strength = metadata.get("denoise_strength")
    if strength is None and metadata.get("reference_strength") is not None:
        try:
            strength = 1 - float(metadata["reference_strength"])
        except (TypeError, ValueError):
            raise InvalidJob(
                "metadata.reference_strength",
                f"must be a number in 0..1, got {metadata['reference_strength']!r}",
            ) from None
    if strength is None:
        return None
    if (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float))
        or not 0 <= strength <= 1
    ):
        raise InvalidJob("denoise_strength", f"must be a number in 0..1, got {strength!r}")
    return float(strength)


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    """An optional text field, kept as sent: an object or number is refused, not stringified."""
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidJob(name, f"must be text, got {type(value).__name__} {value!r:.80}")
    return value
