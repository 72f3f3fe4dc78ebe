"""The job model speaks the platform's wire contract (CONTRACT.md sections 1, 2 and 5).

Plain function calls, no Redis: both body shapes, both generations of config names, the
eight job types' defaults, and every limit refused with an error naming the field and the
range, never with another exception (one would stop the bridge on that item).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings

from tests.payloads import FRONTEND_FIELDS, extreme_jobs, json_object
from worker.errors import InvalidJob
from worker.jobs.model import (
    SEED_MAX,
    Job,
    decode_body,
    job_id_of,
    job_type_of,
    normalise_frames,
    parse_job,
)

JOB_ID = "3f1c9a52-7d2e-4b8a-9c61-0e5f2d8b4a17"
USER_ID = "a6b1d2c3-0000-4e5f-8a9b-123456789abc"


def body(**overrides: Any) -> dict[str, Any]:
    """A valid video_fast body as the platform sends it; keyword arguments replace fields."""
    base: dict[str, Any] = {
        "id": JOB_ID,
        "type": "video_fast",
        "prompt": "a red fox running through snow",
        "user_id": USER_ID,
        "config": {},
        "metadata": {},
    }
    base.update(overrides)
    return base


def config(**values: Any) -> dict[str, Any]:
    """A valid body whose `config` holds exactly these values."""
    return body(config=values)


def metadata(**values: Any) -> dict[str, Any]:
    """A valid body whose `metadata` holds exactly these values."""
    return body(metadata=values)


def refusal(job_body: dict[str, Any]) -> InvalidJob:
    """The InvalidJob that parsing this body raises."""
    with pytest.raises(InvalidJob) as caught:
        parse_job(job_body)
    return caught.value


# --- Section 1: both body shapes ------------------------------------------------------


def test_a_json_object_body_decodes_to_the_object() -> None:
    assert decode_body(json.dumps(body())) == body()


def test_a_one_element_array_holding_the_object_as_a_string_decodes_to_the_object() -> None:
    raw = json.dumps([json.dumps(body())])
    assert raw.startswith('["{\\"id\\"')
    assert decode_body(raw) == body()


@pytest.mark.parametrize("wrapped", [False, True], ids=["object", "array"])
def test_bytes_as_read_from_redis_decode_like_text(wrapped: bool) -> None:
    text = json.dumps(body())
    raw = json.dumps([text]) if wrapped else text
    assert decode_body(raw.encode()) == body()


@pytest.mark.parametrize(
    "raw",
    [
        "not json at all",
        b"\xff\xfe\xfa",
        "[1, 2, 3]",
        "[]",
        '"a string"',
        "42",
        "null",
        '["not json inside"]',
        '["[1, 2]"]',
        json.dumps([json.dumps(body()), json.dumps(body())]),
        "[" * 100_000 + "]" * 100_000,
        "1" * 5_000,
        json.dumps(body()).encode("utf-16"),
        json.dumps(body()).encode("utf-32-le"),
    ],
    ids=[
        "text",
        "undecodable-bytes",
        "list-of-numbers",
        "empty-list",
        "string",
        "number",
        "null",
        "array-of-non-json",
        "array-of-json-list",
        "two-element-array",
        "deeply-nested",
        "integer-over-4300-digits",
        "utf-16",
        "utf-32",
    ],
)
def test_a_body_that_is_not_a_job_object_is_refused_naming_the_body(raw: str | bytes) -> None:
    with pytest.raises(InvalidJob) as caught:
        decode_body(raw)
    assert caught.value.field == "body"


def test_a_decoded_body_parses_into_a_job() -> None:
    job = parse_job(decode_body(json.dumps([json.dumps(body())]).encode()))
    assert (job.id, job.user_id, job.prompt) == (JOB_ID, USER_ID, body()["prompt"])


# --- Section 2: the eight job types' defaults -----------------------------------------

TYPE_DEFAULTS = [
    # type, frames_requested, frames, steps, guidance, enhance, content type, extension
    ("image_fast", 1, 1, 25, 6.5, False, "image", "png"),
    ("image_high", 1, 1, 50, 7.5, False, "image", "png"),
    ("video_fast", 83, 81, 25, 6.5, False, "video", "mp4"),
    ("video_high", 83, 81, 50, 7.5, False, "video", "mp4"),
    ("image7b_fast_enhanced", 1, 1, 25, 6.5, True, "image", "png"),
    ("image7b_high_enhanced", 1, 1, 50, 7.5, True, "image", "png"),
    ("video7b_fast_enhanced", 83, 81, 25, 6.5, True, "video", "mp4"),
    ("video7b_high_enhanced", 83, 81, 50, 7.5, True, "video", "mp4"),
]


@pytest.mark.parametrize(
    ("job_type", "requested", "frames", "steps", "guidance", "enhance", "content", "ext"),
    TYPE_DEFAULTS,
    ids=[row[0] for row in TYPE_DEFAULTS],
)
def test_each_job_type_supplies_the_contract_defaults(
    job_type: str,
    requested: int,
    frames: int,
    steps: int,
    guidance: float,
    enhance: bool,
    content: str,
    ext: str,
) -> None:
    job = parse_job(body(type=job_type))
    assert job.type == job_type
    assert (job.frames_requested, job.frames) == (requested, frames)
    assert (job.steps, job.guidance) == (steps, guidance)
    assert job.enhance is enhance
    assert (job.width, job.height) == (480, 832)
    assert job.shift == 5.0
    assert job.seed is None
    assert job.negative_prompt == ""
    assert job.reference_mode == "none"
    assert job.reference_urls == {}
    assert job.denoise_strength is None
    assert job.content_type == content
    assert job.extension == ext


def test_all_eight_job_types_are_covered() -> None:
    assert len({row[0] for row in TYPE_DEFAULTS}) == 8


# --- Section 1: newer and older config names ------------------------------------------


def attribute_of(job: Job, attribute: str) -> Any:
    """A job attribute, with "size" meaning (width, height)."""
    return (job.width, job.height) if attribute == "size" else getattr(job, attribute)


@pytest.mark.parametrize(
    ("values", "attribute", "expected"),
    [
        ({"num_inference_steps": 30}, "steps", 30),
        ({"sample_steps": 40}, "steps", 40),
        ({"guidance_scale": 5.0}, "guidance", 5.0),
        ({"sample_guide_scale": 9}, "guidance", 9.0),
        ({"resolution": "832x480"}, "size", (832, 480)),
        ({"resolution": "512X512"}, "size", (512, 512)),
        ({"size": "832*480"}, "size", (832, 480)),
        ({"sample_shift": 3.0}, "shift", 3.0),
        ({"frame_num": 49}, "frames", 49),
        ({"seed": 42}, "seed", 42),
        ({"seed": 0}, "seed", 0),
        ({"seed": SEED_MAX}, "seed", SEED_MAX),
        ({"seed": -1}, "seed", None),
        ({"enhance_prompt": True}, "enhance", True),
    ],
    ids=[
        "num_inference_steps",
        "sample_steps",
        "guidance_scale",
        "sample_guide_scale",
        "resolution",
        "resolution-upper-x",
        "size",
        "sample_shift",
        "frame_num",
        "seed",
        "seed-0",
        "seed-max",
        "seed-minus-1-is-random",
        "enhance_prompt",
    ],
)
def test_config_values_under_either_generation_of_names_are_honoured(
    values: dict[str, Any], attribute: str, expected: Any
) -> None:
    assert attribute_of(parse_job(config(**values)), attribute) == expected


@pytest.mark.parametrize(
    ("values", "attribute", "expected"),
    [
        ({"num_inference_steps": 30, "sample_steps": 40}, "steps", 30),
        ({"guidance_scale": 5.0, "sample_guide_scale": 9.0}, "guidance", 5.0),
        ({"resolution": "512x512", "size": "832*480"}, "size", (512, 512)),
    ],
    ids=["steps", "guidance", "size"],
)
def test_the_newer_name_wins_when_both_generations_are_sent(
    values: dict[str, Any], attribute: str, expected: Any
) -> None:
    assert attribute_of(parse_job(config(**values)), attribute) == expected


def test_enhance_prompt_false_turns_enhancement_off_for_an_enhanced_type() -> None:
    job = parse_job(body(type="video7b_fast_enhanced", config={"enhance_prompt": False}))
    assert job.enhance is False


def test_a_negative_prompt_is_honoured() -> None:
    assert parse_job(body(negative_prompt="blurry")).negative_prompt == "blurry"


def test_legacy_top_level_job_id_and_wan_prefixed_job_type_are_understood() -> None:
    legacy = body(job_id=JOB_ID, job_type="wan_video_high")
    del legacy["id"], legacy["type"]
    job = parse_job(legacy)
    assert (job.id, job.type) == (JOB_ID, "video_high")


def test_legacy_job_type_wan_video_fast_means_video_fast() -> None:
    legacy = body(job_type="wan_video_fast")
    del legacy["type"]
    assert parse_job(legacy).type == "video_fast"


def test_legacy_duplicate_fields_are_tolerated_beside_the_new_ones() -> None:
    job = parse_job(
        body(
            job_id=JOB_ID,
            job_type="wan_video_fast",
            quality="fast",
            format="video",
            content_type="video",
            compel_enabled=False,
            compel_weights=None,
            bucket="workspace-temp",
            created_at="2025-07-01T12:00:00Z",
            video_id="v-1",
            image_id=None,
        )
    )
    assert (job.id, job.type, job.video_id, job.image_id) == (JOB_ID, "video_fast", "v-1", None)


@pytest.mark.parametrize(
    ("job_type", "quality", "steps", "guidance"),
    [
        ("video_high", "fast", 25, 6.5),
        ("video_fast", "balanced", 35, 7.0),
        ("image_fast", "high", 50, 7.5),
    ],
)
def test_a_named_quality_preset_sets_steps_and_guidance(
    job_type: str, quality: str, steps: int, guidance: float
) -> None:
    job = parse_job(body(type=job_type, quality=quality))
    assert (job.steps, job.guidance) == (steps, guidance)


def test_config_values_override_the_quality_preset() -> None:
    job = parse_job(body(quality="balanced", config={"num_inference_steps": 40}))
    assert (job.steps, job.guidance) == (40, 7.0)
    job = parse_job(body(quality="balanced", config={"sample_guide_scale": 3.0}))
    assert (job.steps, job.guidance) == (35, 3.0)


@pytest.mark.parametrize("quality", ["ultra", ["fast"], {"level": "fast"}], ids=repr)
def test_an_unknown_quality_preset_is_refused_naming_quality(quality: Any) -> None:
    assert refusal(body(quality=quality)).field == "quality"


# --- Section 5: limits ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("job_body", "field", "fragments"),
    [
        (config(frame_num=0), "config.frame_num", ["0 is outside", "1..961"]),
        (config(frame_num=962), "config.frame_num", ["962", "1..961"]),
        (config(frame_num=5000), "config.frame_num", ["5000", "1..961"]),
        (config(resolution="100x832"), "config.resolution", ["width 100", "256..1280"]),
        (config(resolution="1300x832"), "config.resolution", ["width 1300", "256..1280"]),
        (config(resolution="250x832"), "config.resolution", ["width 250", "256..1280"]),
        (config(resolution="500x832"), "config.resolution", ["width 500", "multiple of 16"]),
        (config(resolution="480x100"), "config.resolution", ["height 100", "256..1280"]),
        (config(resolution="480x1300"), "config.resolution", ["height 1300", "256..1280"]),
        (config(resolution="480x250"), "config.resolution", ["height 250", "256..1280"]),
        (config(resolution="480x500"), "config.resolution", ["height 500", "multiple of 16"]),
        (config(size="100*832"), "config.size", ["width 100", "256..1280"]),
        (config(size="480*1300"), "config.size", ["height 1300", "256..1280"]),
        (config(num_inference_steps=0), "config.num_inference_steps", ["0 is outside", "1..100"]),
        (config(num_inference_steps=101), "config.num_inference_steps", ["101", "1..100"]),
        (config(sample_steps=101), "config.sample_steps", ["101", "1..100"]),
        (config(guidance_scale=-1), "config.guidance_scale", ["-1", "0..20"]),
        (config(guidance_scale=21), "config.guidance_scale", ["21", "0..20"]),
        (config(sample_guide_scale=21.5), "config.sample_guide_scale", ["21.5", "0..20"]),
        (body(prompt="x" * 2001), "prompt", ["2001", "2000"]),
        (config(seed=-5), "config.seed", ["-5", f"0..{SEED_MAX}"]),
        (config(seed=SEED_MAX + 1), "config.seed", [str(SEED_MAX + 1), f"0..{SEED_MAX}"]),
    ],
    ids=[
        "frames-0",
        "frames-962",
        "frames-5000",
        "width-100",
        "width-1300",
        "width-250",
        "width-500",
        "height-100",
        "height-1300",
        "height-250",
        "height-500",
        "size-width-100",
        "size-height-1300",
        "steps-0",
        "steps-101",
        "sample_steps-101",
        "guidance-minus-1",
        "guidance-21",
        "sample_guide_scale-21.5",
        "prompt-2001-chars",
        "seed-minus-5",
        "seed-over-max",
    ],
)
def test_a_value_outside_its_limit_is_refused_naming_the_field_the_value_and_the_limit(
    job_body: dict[str, Any], field: str, fragments: list[str]
) -> None:
    error = refusal(job_body)
    assert error.field == field
    assert str(error).startswith(f"{field}: ")
    for fragment in fragments:
        assert fragment in str(error)


@pytest.mark.parametrize(
    ("job_body", "field"),
    [
        ({k: v for k, v in body().items() if k != "prompt"}, "prompt"),
        (body(prompt=""), "prompt"),
        (body(prompt="   "), "prompt"),
        (body(prompt=["a", "b"]), "prompt"),
        (body(negative_prompt="x" * 2001), "negative_prompt"),
        ({k: v for k, v in body().items() if k != "user_id"}, "user_id"),
        ({k: v for k, v in body().items() if k != "id"}, "id"),
        ({k: v for k, v in body().items() if k != "type"}, "type"),
        (body(type="video_ultra"), "type"),
        (body(type="wan_image_medium"), "type"),
        (body(user_id="a/b"), "user_id"),
        (body(user_id=".."), "user_id"),
        (body(user_id="../other-user"), "user_id"),
        (body(user_id=12345), "user_id"),
        (body(id="../escape"), "id"),
        (body(id="a/b"), "id"),
        (body(config="not an object"), "config"),
        (body(metadata=[1, 2]), "metadata"),
    ],
    ids=[
        "prompt-missing",
        "prompt-empty",
        "prompt-blank",
        "prompt-not-text",
        "negative-prompt-2001-chars",
        "user_id-missing",
        "id-missing",
        "type-missing",
        "type-unknown",
        "type-unknown-wan-prefixed",
        "user_id-slash",
        "user_id-dot-dot",
        "user_id-traversal",
        "user_id-not-text",
        "id-traversal",
        "id-slash",
        "config-not-object",
        "metadata-not-object",
    ],
)
def test_a_missing_or_unsafe_field_is_refused_naming_it(
    job_body: dict[str, Any], field: str
) -> None:
    assert refusal(job_body).field == field


def test_an_unknown_type_is_refused_naming_it_and_the_known_types() -> None:
    message = str(refusal(body(type="video_ultra")))
    assert "video_ultra" in message
    assert "video7b_high_enhanced" in message


@pytest.mark.parametrize(
    ("values", "field", "shown"),
    [
        ({"num_inference_steps": 25.5}, "config.num_inference_steps", "25.5"),
        ({"num_inference_steps": "25"}, "config.num_inference_steps", "'25'"),
        ({"num_inference_steps": True}, "config.num_inference_steps", "True"),
        ({"sample_steps": [25]}, "config.sample_steps", "[25]"),
        ({"frame_num": 81.5}, "config.frame_num", "81.5"),
        ({"guidance_scale": "high"}, "config.guidance_scale", "'high'"),
        ({"seed": 4.2}, "config.seed", "4.2"),
        ({"seed": "42"}, "config.seed", "'42'"),
    ],
    ids=repr,
)
def test_a_value_of_the_wrong_kind_is_refused_naming_the_field_and_the_value(
    values: dict[str, Any], field: str, shown: str
) -> None:
    error = refusal(config(**values))
    assert error.field == field
    assert shown in str(error)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"num_inference_steps": float("nan")}, "config.num_inference_steps"),
        ({"num_inference_steps": float("inf")}, "config.num_inference_steps"),
        ({"frame_num": float("inf")}, "config.frame_num"),
        ({"guidance_scale": float("nan")}, "config.guidance_scale"),
        ({"sample_shift": float("inf")}, "config.sample_shift"),
        ({"resolution": "480x8\u00b32"}, "config.resolution"),
        ({"size": "480*"}, "config.size"),
        ({"resolution": "480"}, "config.resolution"),
        ({"resolution": "-480x832"}, "config.resolution"),
    ],
    ids=repr,
)
def test_a_malformed_config_value_is_an_invalid_job_never_another_exception(
    values: dict[str, Any], field: str
) -> None:
    assert refusal(config(**values)).field == field


def test_non_finite_numbers_that_python_json_accepts_reach_parse_job_as_invalid_jobs() -> None:
    raw = json.dumps(config(num_inference_steps=float("nan")))
    assert "NaN" in raw
    assert refusal(decode_body(raw)).field == "config.num_inference_steps"


@pytest.mark.parametrize(
    ("job_body", "field", "shown"),
    [
        (config(enhance_prompt="false"), "config.enhance_prompt", "'false'"),
        (config(enhance_prompt="true"), "config.enhance_prompt", "'true'"),
        (config(enhance_prompt=0), "config.enhance_prompt", "0"),
        (config(size="\uff14\uff18\uff10*832"), "config.size", "'\uff14\uff18\uff10*832'"),
        (config(resolution="480x\u0668\u0663\u0662"), "config.resolution", "480x"),
        (body(config=[]), "config", "list"),
        (body(config=""), "config", "str"),
        (body(config=0), "config", "int"),
        (body(metadata=[]), "metadata", "list"),
        (body(negative_prompt=0), "negative_prompt", "0"),
        (body(negative_prompt=12.5), "negative_prompt", "12.5"),
        (body(negative_prompt=["blurry"]), "negative_prompt", "['blurry']"),
        (body(video_id={"id": "v-1"}), "video_id", "dict"),
        (body(video_id=17), "video_id", "int"),
        (body(image_id=["i-1"]), "image_id", "list"),
        (body(id="abc\n"), "id", "abc"),
        (body(user_id="user-1\n"), "user_id", "user"),
    ],
    ids=[
        "enhance_prompt-string-false",
        "enhance_prompt-string-true",
        "enhance_prompt-zero",
        "size-fullwidth-digits",
        "resolution-arabic-indic-digits",
        "config-empty-list",
        "config-empty-string",
        "config-zero",
        "metadata-empty-list",
        "negative_prompt-zero",
        "negative_prompt-number",
        "negative_prompt-list",
        "video_id-object",
        "video_id-number",
        "image_id-list",
        "id-trailing-newline",
        "user_id-trailing-newline",
    ],
)
def test_a_field_of_the_wrong_kind_is_refused_naming_it_never_coerced(
    job_body: dict[str, Any], field: str, shown: str
) -> None:
    error = refusal(job_body)
    assert error.field == field
    assert str(error).startswith(f"{field}: ")
    assert shown in str(error)


@pytest.mark.parametrize("enhance", [True, False])
def test_enhance_prompt_takes_real_booleans(enhance: bool) -> None:
    assert parse_job(body(type="video_fast", config={"enhance_prompt": enhance})).enhance is enhance


def test_video_and_image_ids_are_kept_as_the_strings_sent() -> None:
    job = parse_job(body(video_id="v-1", image_id="i-2"))
    assert (job.video_id, job.image_id) == ("v-1", "i-2")


@pytest.mark.parametrize(
    ("job_body", "attribute", "expected"),
    [
        (config(frame_num=1), "frames", 1),
        (config(frame_num=121), "frames", 121),
        (config(resolution="256x1280"), "size", (256, 1280)),
        (config(resolution="1280x256"), "size", (1280, 256)),
        (config(size="256*256"), "size", (256, 256)),
        (config(num_inference_steps=1), "steps", 1),
        (config(num_inference_steps=100), "steps", 100),
        (config(num_inference_steps=30.0), "steps", 30),
        (config(guidance_scale=0), "guidance", 0.0),
        (config(guidance_scale=20), "guidance", 20.0),
        (body(prompt="x" * 2000), "prompt", "x" * 2000),
        (body(negative_prompt="x" * 2000), "negative_prompt", "x" * 2000),
    ],
    ids=[
        "frames-1",
        "frames-121",
        "256x1280",
        "1280x256",
        "size-256",
        "steps-1",
        "steps-100",
        "steps-whole-float",
        "guidance-0",
        "guidance-20",
        "prompt-2000-chars",
        "negative-prompt-2000-chars",
    ],
)
def test_a_value_on_the_boundary_of_its_limit_is_accepted(
    job_body: dict[str, Any], attribute: str, expected: Any
) -> None:
    job = parse_job(job_body)
    actual = (job.width, job.height) if attribute == "size" else getattr(job, attribute)
    assert actual == expected


# --- Frames: 4n+1, the request kept ---------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "real"),
    [(83, 81), (81, 81), (121, 121), (2, 1), (1, 1), (4, 1), (5, 5), (120, 117)],
)
def test_frames_are_normalised_down_to_4n_plus_1_and_the_request_is_kept(
    requested: int, real: int
) -> None:
    job = parse_job(config(frame_num=requested))
    assert (job.frames, job.frames_requested) == (real, requested)
    assert normalise_frames(requested) == real
    assert (job.frames - 1) % 4 == 0


def test_frames_83_are_normalised_to_81_and_the_request_is_kept() -> None:
    job = parse_job(body(type="video_fast"))
    assert (job.frames_requested, job.frames) == (83, 81)


@pytest.mark.parametrize("job_type", ["image_fast", "image7b_high_enhanced"])
def test_an_image_type_asking_for_81_frames_is_refused(job_type: str) -> None:
    error = refusal(body(type=job_type, config={"frame_num": 81}))
    assert error.field == "config.frame_num"
    assert "81" in str(error)


def test_an_image_type_asking_for_1_frame_is_accepted() -> None:
    assert parse_job(body(type="image_high", config={"frame_num": 1})).frames == 1


# --- References and image-to-image strength --------------------------------------------

IMAGE_URL = "https://cdn.example.com/ref.png"
START_URL = "https://cdn.example.com/start.png"
END_URL = "https://cdn.example.com/end.png"


@pytest.mark.parametrize(
    ("job_body", "mode", "urls"),
    [
        (config(image=IMAGE_URL), "single", {"single": IMAGE_URL}),
        (metadata(reference_image_url=IMAGE_URL), "single", {"single": IMAGE_URL}),
        (config(first_frame=START_URL), "start", {"start": START_URL}),
        (metadata(start_reference_url=START_URL), "start", {"start": START_URL}),
        (config(last_frame=END_URL), "end", {"end": END_URL}),
        (metadata(end_reference_url=END_URL), "end", {"end": END_URL}),
        (
            config(first_frame=START_URL, last_frame=END_URL),
            "both",
            {"start": START_URL, "end": END_URL},
        ),
        (
            body(config={"first_frame": START_URL}, metadata={"end_reference_url": END_URL}),
            "both",
            {"start": START_URL, "end": END_URL},
        ),
        (body(), "none", {}),
    ],
    ids=[
        "config.image",
        "metadata.reference_image_url",
        "config.first_frame",
        "metadata.start_reference_url",
        "config.last_frame",
        "metadata.end_reference_url",
        "config-start-and-end",
        "mixed-start-and-end",
        "no-reference",
    ],
)
def test_the_reference_mode_is_inferred_from_the_references_given(
    job_body: dict[str, Any], mode: str, urls: dict[str, str]
) -> None:
    job = parse_job(job_body)
    assert job.reference_mode == mode
    assert job.reference_urls == urls


@pytest.mark.parametrize(
    ("config_name", "metadata_name", "role"),
    [
        ("image", "reference_image_url", "single"),
        ("first_frame", "start_reference_url", "start"),
        ("last_frame", "end_reference_url", "end"),
    ],
)
def test_a_reference_in_config_wins_over_the_one_in_metadata(
    config_name: str, metadata_name: str, role: str
) -> None:
    job = parse_job(
        body(
            config={config_name: "https://config.example.com/a.png"},
            metadata={metadata_name: "https://metadata.example.com/b.png"},
        )
    )
    assert job.reference_urls == {role: "https://config.example.com/a.png"}


@pytest.mark.parametrize("key", ["video_reference_mode", "reference_mode"])
def test_a_mode_field_that_drops_a_reference_is_reported_and_the_references_decide(
    key: str,
) -> None:
    job = parse_job(
        metadata(**{key: "start", "start_reference_url": START_URL, "end_reference_url": END_URL})
    )
    assert job.reference_mode == "both"
    assert job.reference_urls == {"start": START_URL, "end": END_URL}
    assert job.reference_notes["reference_mode_note"] == (
        f"metadata.{key} 'start' disagrees with the references sent (start, end): "
        "the references decide, mode 'both'"
    )


def test_a_mode_field_that_agrees_adds_no_note() -> None:
    job = parse_job(metadata(reference_mode="start", start_reference_url=START_URL))
    assert job.reference_mode == "start" and job.reference_notes == {}


@pytest.mark.parametrize("where", ["config", "metadata"])
def test_an_unknown_reference_mode_is_refused(where: str) -> None:
    error = refusal(body(**{where: {"video_reference_mode": "sideways"}}))
    assert error.field == f"{where}.video_reference_mode"
    assert "sideways" in str(error)


def test_a_reference_that_is_not_a_string_is_refused_naming_where_it_was() -> None:
    assert refusal(config(image=12345)).field == "config.image"


@pytest.mark.parametrize(
    ("job_body", "strength"),
    [
        (config(denoise_strength=0.3), 0.3),
        (metadata(denoise_strength=0.4), 0.4),
        (metadata(reference_strength=0.8), pytest.approx(0.2)),
        (body(config={"denoise_strength": 0.3}, metadata={"denoise_strength": 0.9}), 0.3),
        (body(config={"denoise_strength": None}, metadata={"denoise_strength": 0.9}), 0.9),
        (metadata(denoise_strength=0.4, reference_strength=0.8), 0.4),
        (config(denoise_strength=0), 0.0),
        (config(denoise_strength=1), 1.0),
        (config(image=IMAGE_URL, pipeline="img2img"), 0.5),
        (config(image=IMAGE_URL), None),
        (body(), None),
    ],
    ids=[
        "config",
        "metadata",
        "one-minus-reference-strength",
        "config-wins-over-metadata",
        "config-null-falls-back-to-metadata",
        "denoise-wins-over-reference-strength",
        "zero",
        "one",
        "default-0.5-for-image-to-image",
        "none-for-reference-frames",
        "none-without-a-reference",
    ],
)
def test_the_denoise_strength_comes_from_config_metadata_or_reference_strength(
    job_body: dict[str, Any], strength: float | None
) -> None:
    assert parse_job(job_body).denoise_strength == strength


@pytest.mark.parametrize(
    "job_body",
    [
        config(denoise_strength=1.5),
        config(denoise_strength=-0.1),
        config(denoise_strength="strong"),
        metadata(reference_strength=1.5),
        metadata(reference_strength="strong"),
        metadata(reference_strength=[0.5]),
    ],
    ids=[
        "denoise-1.5",
        "denoise-negative",
        "denoise-text",
        "reference-strength-1.5",
        "reference-strength-text",
        "reference-strength-list",
    ],
)
def test_a_bad_strength_is_an_invalid_job_never_another_exception(
    job_body: dict[str, Any],
) -> None:
    assert "strength" in refusal(job_body).field


def test_unknown_metadata_keys_are_kept_on_the_job() -> None:
    extra = {"exact_copy_mode": False, "enhancement_type": "qwen", "user_flavour": {"x": [1]}}
    job = parse_job(metadata(**extra))
    assert job.metadata == extra


def test_a_job_survives_a_round_trip_through_its_json_record() -> None:
    job = parse_job(
        body(
            type="image7b_high_enhanced",
            config={"seed": 7, "resolution": "512x768"},
            metadata={"reference_image_url": IMAGE_URL, "anything": 1},
        )
    )
    assert Job.model_validate_json(job.model_dump_json()) == job


# --- Ids and storage keys -------------------------------------------------------------


@pytest.mark.parametrize(
    ("job_body", "expected"),
    [
        ({"id": JOB_ID}, JOB_ID),
        ({"job_id": JOB_ID}, JOB_ID),
        ({"id": "job_1-a"}, "job_1-a"),
        ({"id": "../etc/passwd"}, None),
        ({"id": "a/b"}, None),
        ({"id": ".."}, None),
        ({"id": ""}, None),
        ({"id": "x" * 129}, None),
        ({"id": "abc\n"}, None),
        ({"job_id": "abc\n"}, None),
        ({"id": 12345}, None),
        ({}, None),
    ],
    ids=repr,
)
def test_job_id_of_returns_the_id_only_when_it_is_safe_for_keys_and_paths(
    job_body: dict[str, Any], expected: str | None
) -> None:
    assert job_id_of(job_body) == expected


@pytest.mark.parametrize(
    ("job_type", "asset"),
    [("video_fast", "0.mp4"), ("video7b_high_enhanced", "0.mp4"), ("image_high", "0.png")],
)
def test_storage_keys_are_user_then_job_then_the_asset_and_its_thumbnail(
    job_type: str, asset: str
) -> None:
    job = parse_job(body(type=job_type))
    assert job.asset_key == f"{USER_ID}/{JOB_ID}/{asset}"
    assert job.thumbnail_key == f"{USER_ID}/{JOB_ID}/0.thumb.webp"


# --- The frontend's own body (submitWANJob): top-level fields ------------------------------

OTHER_URL = "https://cdn.example.com/other.png"


def frontend(**fields: Any) -> dict[str, Any]:
    """A body as the frontend's job builder makes it: every top-level field, null where the
    user left it empty; keyword arguments replace fields (config and metadata empty)."""
    top: dict[str, Any] = {name: None for name in FRONTEND_FIELDS} | {"quality": None}
    return body(**(top | fields))


# The bulk of the table: each value from each place it can come from, and which place wins.
# Through real workers: tests/test_reference_jobs.py, the frontend's body section.
FRONTEND_TABLE = {
    # size: the top-level sides count where config has no resolution or size
    "width-top": (frontend(width=512), "size", (512, 832)),
    "height-top": (frontend(height=256), "size", (480, 256)),
    "size-top": (frontend(width=832, height=480), "size", (832, 480)),
    "resolution-wins-over-top": (
        frontend(width=832, height=480, config={"resolution": "256x256"}), "size", (256, 256)),
    "size-wins-over-top": (
        frontend(width=832, height=480, config={"size": "512*256"}), "size", (512, 256)),
    "width-float-whole": (frontend(width=512.0), "size", (512, 832)),
    # frames
    "frame_num-top": (frontend(frame_num=49), "frames", 49),
    "frame_num-top-normalised": (frontend(frame_num=83), "frames", 81),
    "frame_num-config-wins": (frontend(frame_num=49, config={"frame_num": 17}), "frames", 17),
    # fps
    "fps-default": (frontend(), "fps", 16),
    "fps-top": (frontend(fps=24), "fps", 24),
    "fps-low-end": (frontend(fps=12), "fps", 12),
    "fps-whole-float": (frontend(fps=20.0), "fps", 20),
    # quality picks the preset
    "quality-top": (frontend(quality="high"), "steps", 50),
    "quality-null-is-the-types": (frontend(quality=None, type="video_high"), "steps", 50),
    "quality-top-config-steps-win": (
        frontend(quality="balanced", config={"num_inference_steps": 3}), "steps", 3),
    # references: config, then metadata, then the top level
    "single-top": (frontend(reference_image_url=IMAGE_URL), "reference_urls",
                   {"single": IMAGE_URL}),
    "single-metadata-wins": (
        frontend(reference_image_url=OTHER_URL, metadata={"reference_image_url": IMAGE_URL}),
        "reference_urls", {"single": IMAGE_URL}),
    "single-config-wins": (
        frontend(reference_image_url=OTHER_URL, config={"image": IMAGE_URL},
                 metadata={"reference_image_url": OTHER_URL}),
        "reference_urls", {"single": IMAGE_URL}),
    "single-nulls-fall-through": (
        frontend(reference_image_url=IMAGE_URL, config={"image": None},
                 metadata={"reference_image_url": None}),
        "reference_urls", {"single": IMAGE_URL}),
    "single-empty-text-falls-through": (
        frontend(reference_image_url=IMAGE_URL, metadata={"reference_image_url": ""}),
        "reference_urls", {"single": IMAGE_URL}),
    "start-top": (frontend(first_frame=START_URL), "reference_urls", {"start": START_URL}),
    "start-top-mode": (frontend(first_frame=START_URL), "reference_mode", "start"),
    "start-metadata-wins": (
        frontend(first_frame=OTHER_URL, metadata={"start_reference_url": START_URL}),
        "reference_urls", {"start": START_URL}),
    "start-config-wins": (
        frontend(first_frame=OTHER_URL, config={"first_frame": START_URL}),
        "reference_urls", {"start": START_URL}),
    "end-top": (frontend(last_frame=END_URL), "reference_urls", {"end": END_URL}),
    "end-metadata-wins": (
        frontend(last_frame=OTHER_URL, metadata={"end_reference_url": END_URL}),
        "reference_urls", {"end": END_URL}),
    "end-config-wins": (
        frontend(last_frame=OTHER_URL, config={"last_frame": END_URL}),
        "reference_urls", {"end": END_URL}),
    "both-top": (frontend(first_frame=START_URL, last_frame=END_URL), "reference_mode", "both"),
    # the mode field: top level last; the references decide
    "mode-top-agrees": (frontend(first_frame=START_URL, reference_mode="start"),
                        "reference_notes", {}),
    "mode-top-disagrees": (
        frontend(first_frame=START_URL, reference_mode="single"), "reference_notes",
        {"reference_mode_note": "reference_mode 'single' disagrees with the references sent "
                                "(start): the references decide, mode 'start'"}),
    "mode-metadata-wins": (
        frontend(first_frame=START_URL, reference_mode="single",
                 metadata={"reference_mode": "start"}),
        "reference_notes", {}),
    # strengths: denoise (config, metadata, top), else 1 - reference (metadata, top)
    "denoise-top": (frontend(reference_image_url=IMAGE_URL, denoise_strength=0.7),
                    "denoise_strength", 0.7),
    "denoise-top-asks-for-i2i": (frontend(reference_image_url=IMAGE_URL, denoise_strength=0.7),
                                 "image_to_image", True),
    "denoise-metadata-wins": (
        frontend(reference_image_url=IMAGE_URL, denoise_strength=0.7,
                 metadata={"denoise_strength": 0.4}),
        "denoise_strength", 0.4),
    "denoise-config-wins": (
        frontend(reference_image_url=IMAGE_URL, denoise_strength=0.7,
                 config={"denoise_strength": 0.3}, metadata={"denoise_strength": 0.4}),
        "denoise_strength", 0.3),
    "reference-strength-top": (frontend(reference_image_url=IMAGE_URL, reference_strength=0.75),
                               "denoise_strength", 0.25),
    "reference-strength-metadata-wins": (
        frontend(reference_image_url=IMAGE_URL, reference_strength=0.75,
                 metadata={"reference_strength": 0.5}),
        "denoise_strength", 0.5),
    "denoise-top-wins-over-reference-strength": (
        frontend(reference_image_url=IMAGE_URL, denoise_strength=0.6,
                 metadata={"reference_strength": 0.9}),
        "denoise_strength", 0.6),
    "no-strength-no-i2i": (frontend(first_frame=START_URL), "image_to_image", False),
    # the target worker
    "target-wan": (frontend(target_worker="wan"), "type", "video_fast"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("job_body", "attribute", "expected"), FRONTEND_TABLE.values(), ids=FRONTEND_TABLE.keys()
)
def test_a_top_level_value_counts_where_config_and_metadata_give_none(
    job_body: dict[str, Any], attribute: str, expected: Any
) -> None:
    assert attribute_of(parse_job(job_body), attribute) == expected


def test_every_top_level_field_null_is_the_same_job_as_none_sent() -> None:
    assert parse_job(frontend()) == parse_job(body())


def test_the_frontends_start_frame_body_runs_with_its_start_frame_size_frames_and_fps() -> None:
    # Given the body submitWANJob builds for a start-frame video, empty fields null
    job = parse_job(
        frontend(
            width=832, height=480, frame_num=49, fps=24, quality="balanced",
            reference_mode="start", first_frame=START_URL, target_worker="wan",
            config={"seed": None, "num_inference_steps": None}, metadata={"source": "web"},
        )
    )  # fmt: skip

    # Then nothing it asked for is lost
    assert (job.width, job.height, job.frames, job.fps) == (832, 480, 49, 24)
    assert (job.quality, job.steps, job.guidance) == ("balanced", 35, 7.0)
    assert (job.reference_mode, job.reference_urls) == ("start", {"start": START_URL})
    assert job.image_to_image is False and job.reference_notes == {}


@pytest.mark.parametrize(
    ("job_body", "field", "fragments"),
    [
        (frontend(fps=11), "fps", ["11", "12..24"]),
        (frontend(fps=25), "fps", ["25", "12..24"]),
        (frontend(fps=60), "fps", ["60", "12..24"]),
        (frontend(fps=23.976), "fps", ["whole number", "23.976"]),
        (frontend(fps="16"), "fps", ["whole number", "'16'"]),
        (frontend(width=100), "width", ["100", "256..1280"]),
        (frontend(width=500), "width", ["500", "multiple of 16"]),
        (frontend(height=2000), "height", ["2000", "256..1280"]),
        (frontend(height="832"), "height", ["whole number"]),
        (frontend(frame_num=1000), "frame_num", ["1000", "1..961"]),
        (frontend(frame_num=81, type="image_fast"), "frame_num", ["image jobs make 1 frame"]),
        (frontend(target_worker="sdxl"), "target_worker", ["'wan'", "'sdxl'"]),
        (frontend(target_worker=["wan"]), "target_worker", ["'wan'"]),
        (frontend(quality="ultra"), "quality", ["ultra", "fast, balanced, high"]),
        (frontend(reference_mode="sideways"), "reference_mode", ["sideways"]),
        (frontend(reference_image_url=5), "reference_image_url", ["URL"]),
        (frontend(first_frame={"url": START_URL}), "first_frame", ["URL"]),
        (frontend(reference_image_url=IMAGE_URL, denoise_strength=2), "denoise_strength",
         ["0..1", "2"]),
        (frontend(reference_image_url=IMAGE_URL, reference_strength=1.5),
         "reference_strength", ["0..1", "1.5"]),
    ],
    ids=["fps-11", "fps-25", "fps-60", "fps-fraction", "fps-text", "width-100", "width-500",
         "height-2000", "height-text", "frame_num-1000", "frame_num-81-for-an-image",
         "target_worker-sdxl", "target_worker-list", "quality-ultra", "reference_mode-sideways",
         "reference_image_url-number", "first_frame-object", "denoise_strength-2",
         "reference_strength-1.5"],
)  # fmt: skip
def test_a_bad_top_level_value_is_refused_naming_it_and_the_limit(
    job_body: dict[str, Any], field: str, fragments: list[str]
) -> None:
    error = refusal(job_body)
    assert error.field == field
    assert str(error).startswith(f"{field}: ")
    for fragment in fragments:
        assert fragment in str(error)


def test_a_bad_config_value_is_named_though_the_top_level_gives_a_good_one() -> None:
    assert refusal(frontend(frame_num=49, config={"frame_num": 1000})).field == "config.frame_num"


# --- Valid JSON with extreme values: decoded, and refused by name where it matters -------


def text_of(fields: dict[str, str]) -> str:
    """A valid body's text with some fields' values replaced by raw JSON texts."""
    return json_object({k: json.dumps(v) for k, v in body().items()} | fields)


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"config": '{"seed": 1' + "0" * 5_000 + "}"}, "config.seed", "integer of 5001 digits"),
        ({"config": '{"frame_num": -' + "9" * 4_400 + "}"}, "config.frame_num", "4400 digits"),
        ({"config": '{"guidance_scale": 1e400}'}, "config.guidance_scale", "inf is outside"),
        ({"fps": "-1e400"}, "fps", "whole number"),
        ({"metadata": '{"n": 1' + "0" * 5_000 + "}"}, "metadata.n", "integer of 5001 digits"),
        ({"metadata": '{"big": 1e400}'}, "metadata.big", "not a finite number"),
        ({"metadata": '{"x": [1, 2, NaN]}'}, "metadata.x[2]", "not a finite number"),
        ({"prompt": '"a fox \\ud800 in snow"'}, "prompt", "\\ud800 at character 6"),
        ({"negative_prompt": '"\\udfff"'}, "negative_prompt", "lone surrogate"),
        ({"video_id": '"v-\\ud83d"'}, "video_id", "lone surrogate"),
        ({"first_frame": '"https://x.example/\\udc00.png"'}, "first_frame", "lone surrogate"),
        ({"metadata": '{"note": "\\ud800"}'}, "metadata.note", "lone surrogate"),
        ({"metadata": '{"\\ud800": 1}'}, "metadata['\\ud800']", "key"),
        ({"metadata": '{"a b": [{"c": "\\udbff"}]}'}, "metadata['a b'][0].c", "lone surrogate"),
        ({"type": '"video_\\ud800"'}, "type", "unknown job type"),
        ({"metadata": '{"x":' + "[" * 40 + "]" * 40 + "}"}, "metadata.x" + "[0]" * 31,
         "nested deeper than 32 levels"),
        ({"metadata": '{"x":' + "[" * 5_000 + "]" * 5_000 + "}"}, "metadata.x" + "[0]" * 31,
         "nested deeper than 32 levels"),
        ({"prompt": "[" * 5_000 + "]" * 5_000}, "prompt", "non-empty text"),
        ({"config": '{"seed": ' + "[" * 5_000 + "]" * 5_000 + "}"}, "config.seed", "[[[...]]]"),
    ],
    ids=[
        "config-integer-over-4300-digits",
        "config-negative-integer-over-4300-digits",
        "config-1e400",
        "top-minus-1e400",
        "metadata-integer-over-4300-digits",
        "metadata-1e400",
        "metadata-nan-in-a-list",
        "prompt-lone-surrogate",
        "negative-prompt-lone-surrogate",
        "video-id-lone-surrogate",
        "top-reference-lone-surrogate",
        "metadata-lone-surrogate",
        "metadata-key-lone-surrogate",
        "metadata-nested-path",
        "type-lone-surrogate",
        "metadata-nested-40",
        "metadata-nested-5000",
        "prompt-nested-5000",
        "config-seed-nested-5000",
    ],
)  # fmt: skip
def test_valid_json_with_extreme_values_is_refused_naming_the_field_that_holds_them(
    fields: dict[str, str], field: str, fragment: str
) -> None:
    error = refusal(decode_body(text_of(fields).encode()))
    assert error.field == field
    assert fragment in str(error)
    assert len(str(error)) < 600  # a quoted value is cut short
    str(error).encode()  # the record and the callback can carry the message


@pytest.mark.parametrize(
    "fields",
    [
        {"unread_field": "[" * 5_000 + "]" * 5_000},
        {"unread_field": "1" * 5_000, "another": "1e400"},
        {"unread_field": '"\\ud800"'},
        {"config": '{"unread_key": ' + "[" * 5_000 + "]" * 5_000 + ', "seed": 3}'},
        {"metadata": '{"x":' + "[" * 31 + "]" * 31 + "}"},
        {"metadata": '{"n": 1' + "0" * 4_000 + "}"},
    ],
    ids=[
        "nested-5000-unread",
        "huge-numbers-unread",
        "lone-surrogate-unread",
        "nested-5000-in-an-unread-config-key",
        "metadata-nested-32",
        "metadata-integer-of-4001-digits",
    ],
)
def test_extreme_values_where_the_job_does_not_read_them_leave_a_job_that_can_be_recorded(
    fields: dict[str, str],
) -> None:
    job = parse_job(decode_body(text_of(fields).encode()))
    assert job.id == JOB_ID
    assert Job.model_validate_json(job.model_dump_json().encode()) == job


@settings(max_examples=300, deadline=None, database=None)
@given(item=extreme_jobs())
def test_any_valid_json_body_with_a_usable_id_decodes_to_a_job_or_a_refusal_naming_a_field(
    item: tuple[bytes, str],
) -> None:
    raw, job_id = item
    decoded = decode_body(raw)
    assert job_id_of(decoded) == job_id
    try:
        job = parse_job(decoded)
    except InvalidJob as error:
        assert error.field and str(error).startswith(f"{error.field}: ")
        assert len(str(error)) < 600
        str(error).encode()
    else:
        job.model_dump_json().encode()
    job_type_of(decoded).encode()


# --- Long videos (CONTRACT.md section 7): frames, seconds, storyboards -----------------


@pytest.mark.parametrize(("requested", "real"), [(122, 121), (500, 497), (961, 961)])
def test_a_video_may_ask_for_up_to_961_frames_normalised_down(requested: int, real: int) -> None:
    job = parse_job(config(frame_num=requested))
    assert (job.frames, job.frames_requested) == (real, requested)


@pytest.mark.parametrize(
    ("seconds", "fps", "asked", "real"),
    [(10, 16, 160, 161), (15, 16, 240, 241), (30, 16, 480, 481), (60, 16, 960, 961),
     (5.06, 16, 81, 81), (2.5, 24, 60, 61), (0.1, 16, 2, 1)],
)  # fmt: skip
def test_duration_seconds_makes_the_nearest_4n_plus_1_frames_and_wins_over_frame_num(
    seconds: float, fps: int, asked: int, real: int
) -> None:
    job = parse_job(body(fps=fps, config={"duration_seconds": seconds, "frame_num": 49}))
    assert (job.frames, job.frames_requested, job.duration_seconds) == (real, asked, seconds)
    assert (job.frames - 1) % 4 == 0


@pytest.mark.parametrize(
    ("job_body", "field", "fragments"),
    [
        (config(duration_seconds=60.2), "config.duration_seconds",
         ["60.2 s at 16 fps is over the limit of 961 frames"]),
        (config(duration_seconds=61), "config.duration_seconds",
         ["61 s at 16 fps is over the limit of 961 frames", "about 60 s at 16 fps"]),
        (body(fps=24, config={"duration_seconds": 60}), "config.duration_seconds",
         ["60 s at 24 fps is over the limit", "about 40 s at 24 fps"]),
        (config(duration_seconds=1e308), "config.duration_seconds", ["1e+308 s", "over the limit"]),
        (config(duration_seconds=0), "config.duration_seconds", ["above 0", "0"]),
        (config(duration_seconds=-5), "config.duration_seconds", ["above 0", "-5"]),
        (config(duration_seconds="10"), "config.duration_seconds", ["above 0", "'10'"]),
        (config(duration_seconds=True), "config.duration_seconds", ["above 0", "True"]),
        (config(duration_seconds=0.01), "config.duration_seconds", ["under one frame"]),
        (body(type="image_fast", config={"duration_seconds": 30}), "config.duration_seconds",
         ["image jobs make 1 frame"]),
        (body(type="image_high", config={"segments": [{"prompt": "a", "seconds": 5}]}),
         "config.segments", ["image jobs make 1 frame"]),
        (config(image=IMAGE_URL, pipeline="img2img", frame_num=200), "config.frame_num",
         ["image to image runs in one pass", "121", "197"]),
        (config(first_frame=START_URL, denoise_strength=0.5, duration_seconds=15),
         "config.duration_seconds", ["image to image runs in one pass", "241"]),
    ],
    ids=["60.2-s", "61-s", "60-s-at-24-fps", "1e308-s", "0-s", "negative", "text", "boolean",
         "under-a-frame", "image-30-s", "image-storyboard", "i2i-200-frames", "i2i-15-s"],
)  # fmt: skip
def test_a_long_request_out_of_bounds_is_refused_naming_the_field(
    job_body: dict[str, Any], field: str, fragments: list[str]
) -> None:
    error = refusal(job_body)
    assert error.field == field
    for fragment in fragments:
        assert fragment in str(error)


def test_image_to_image_keeps_its_one_pass_up_to_121_frames() -> None:
    assert parse_job(config(image=IMAGE_URL, pipeline="img2img", frame_num=121)).frames == 121


def storyboard(*segments: tuple[str, float], **extra: Any) -> dict[str, Any]:
    scenes = [{"prompt": prompt, "seconds": seconds} for prompt, seconds in segments]
    return config(segments=scenes, **extra)


def test_a_storyboard_keeps_its_segments_in_order_and_their_frames_make_the_video() -> None:
    job = parse_job(storyboard(("a fox in the snow", 5), ("the fox in a city", 2.5),
                               ("night falls", 3)))  # fmt: skip

    assert [s.prompt for s in job.segments] == ["a fox in the snow", "the fox in a city",
                                                 "night falls"]  # fmt: skip
    # the first segment 4n+1 frames, each later one a multiple of 4
    assert [s.frames for s in job.segments] == [81, 40, 48]
    assert job.frames == 169 and (job.frames - 1) % 4 == 0
    assert job.duration_seconds == 10.5 and job.frames_requested == 80 + 40 + 48
    assert job.length_notes == {}


def test_a_storyboard_decides_the_length_and_says_what_it_overrode() -> None:
    job = parse_job(storyboard(("a", 1), ("b", 1), duration_seconds=30, frame_num=83))
    assert job.frames == 17 + 16
    assert "config.duration_seconds, config.frame_num ignored" in job.length_notes["length_note"]


@pytest.mark.parametrize(
    ("job_body", "field", "fragment"),
    [
        (config(segments=[]), "config.segments", "non-empty list"),
        (config(segments={"prompt": "a", "seconds": 5}), "config.segments", "non-empty list"),
        (config(segments=["a fox"]), "config.segments[0]", "must be an object"),
        (storyboard(("a", 5), ("", 5)), "config.segments[1].prompt", "non-empty text"),
        (storyboard(("a", 5), ("x" * 2001, 5)), "config.segments[1].prompt", "2001 characters"),
        (storyboard(("a", 5), ("\ud800", 5)), "config.segments[1].prompt", "lone surrogate"),
        (storyboard(("a", 0)), "config.segments[0].seconds", "above 0"),
        (config(segments=[{"prompt": "a"}]), "config.segments[0].seconds", "above 0"),
        (storyboard(("a", 30), ("b", 31)), "config.segments", "over the limit of 961"),
        (storyboard(("a", 1), ("b", 1e308)), "config.segments[1].seconds", "over the limit"),
        (storyboard(*[("a", 0.01)] * 300), "config.segments", "over the limit of 961"),
    ],
    ids=["empty", "object", "text-item", "empty-prompt", "long-prompt", "surrogate",
         "0-s", "no-seconds", "61-s", "1e308-s", "300-tiny-segments"],
)  # fmt: skip
def test_a_bad_storyboard_is_refused_naming_the_segment_and_field(
    job_body: dict[str, Any], field: str, fragment: str
) -> None:
    error = refusal(job_body)
    assert error.field == field
    assert fragment in str(error)
