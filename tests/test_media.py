"""Unit tests of the media package: what a user gets, checked with independent readers.

No Redis, no Celery. Files the module writes are read back with PyAV, Pillow or raw bytes,
never with the module under test; bad files for the checks are built by hand or with PyAV.
"""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from media.checks import MIN_BYTES, check_file, mp4_top_level_boxes
from media.encode import encode_mp4, write_png
from media.spool import (
    frames_path,
    job_dir,
    read_frames,
    remove_job,
    remove_windows,
    windows_dir,
    windows_written,
    write_frames,
    write_window,
)
from media.storage import LocalStorage, make_storage
from media.thumbnail import make_thumbnail, middle_frame
from worker.errors import MediaCheckFailed
from worker.settings import Settings

FPS = 16
HEIGHT, WIDTH = 256, 384


# ---------------------------------------------------------------- helpers


def moving_gradients(count: int = 9, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """(F, H, W, 3) uint8 frames: smooth colour gradients that shift right frame by frame."""
    ys = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    xs = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for i in range(count):
        shifted = (xs + 12 * i) % 256
        frames[i, ..., 0] = np.broadcast_to(shifted, (height, width))
        frames[i, ..., 1] = np.broadcast_to(ys, (height, width))
        frames[i, ..., 2] = np.broadcast_to((shifted + ys) / 2, (height, width))
    return frames


def numbered_frames(count: int, height: int, width: int) -> np.ndarray:
    """Frames filled with a flat grey that differs per frame (20, 40, 60, ...)."""
    values = (20 * (np.arange(count) + 1)).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None], (count, height, width, 3)).copy()


def noise_frames(count: int = 9, height: int = 64, width: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


def decode_video(path: Path) -> tuple[av.video.stream.VideoStream, list[av.VideoFrame]]:
    """Open with PyAV (not with the module under test) and decode every frame."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        return stream, frames


def encode_without_faststart(frames: np.ndarray, out: Path) -> Path:
    """A valid H.264 MP4 the ordinary way: moov written last, after mdat."""
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        _, stream.height, stream.width, _ = frames.shape
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return out


def raw_top_level_boxes(data: bytes) -> list[str]:
    """Top-level box names parsed independently of media.checks (32-bit sizes suffice here)."""
    names, offset = [], 0
    while offset + 8 <= len(data):
        size, name = struct.unpack(">I4s", data[offset : offset + 8])
        names.append(name.decode("latin-1"))
        assert size >= 8, f"box {name!r} at {offset} has size {size}"
        offset += size
    return names


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def good_mp4(tmp_path: Path) -> Path:
    return encode_mp4(moving_gradients(), tmp_path / "0.mp4", fps=FPS)


@pytest.fixture
def good_png(tmp_path: Path) -> Path:
    return write_png(moving_gradients(1)[0], tmp_path / "0.png")


@pytest.fixture
def good_webp(tmp_path: Path) -> Path:
    return make_thumbnail(moving_gradients(1)[0], tmp_path / "0.thumb.webp")


# ---------------------------------------------------------------- encode_mp4


def test_encoded_mp4_decodes_to_every_frame_as_h264_yuv420p_at_16_fps(good_mp4: Path) -> None:
    stream, frames = decode_video(good_mp4)

    assert len(frames) == 9
    assert stream.codec_context.name == "h264"
    assert (stream.codec_context.width, stream.codec_context.height) == (WIDTH, HEIGHT)
    assert stream.average_rate == FPS
    assert all(f.format.name == "yuv420p" for f in frames)
    assert all((f.width, f.height) == (WIDTH, HEIGHT) for f in frames)
    assert [f.time for f in frames] == pytest.approx([i / FPS for i in range(9)])


def test_encoded_mp4_frames_look_like_the_source_frames(good_mp4: Path) -> None:
    source = moving_gradients()
    _, frames = decode_video(good_mp4)

    for original, decoded in zip(source, frames, strict=True):
        difference = np.abs(decoded.to_ndarray(format="rgb24").astype(int) - original.astype(int))
        assert difference.mean() < 6, "lossy, but the picture must be the same picture"


def test_encoded_mp4_starts_with_ftyp_and_has_moov_before_mdat(good_mp4: Path) -> None:
    data = good_mp4.read_bytes()

    assert data[4:8] == b"ftyp"
    boxes = raw_top_level_boxes(data)
    assert boxes.index("moov") < boxes.index("mdat"), f"not faststart: {boxes}"


def test_a_one_frame_video_encodes_and_decodes(tmp_path: Path) -> None:
    out = encode_mp4(moving_gradients(1), tmp_path / "one.mp4", fps=FPS)

    _, frames = decode_video(out)
    assert len(frames) == 1
    assert (frames[0].width, frames[0].height) == (WIDTH, HEIGHT)
    assert check_file(out, "mp4") == out.stat().st_size


def test_encode_mp4_accepts_frames_memory_mapped_from_the_spool(tmp_path: Path) -> None:
    spooled = write_frames(tmp_path / "job" / "frames.npy", moving_gradients())

    out = encode_mp4(read_frames(spooled), tmp_path / "job" / "0.mp4", fps=FPS)

    assert len(decode_video(out)[1]) == 9


def test_encode_mp4_creates_missing_parent_directories(tmp_path: Path) -> None:
    out = encode_mp4(moving_gradients(2), tmp_path / "a" / "b" / "0.mp4", fps=FPS)

    assert out.is_file()


# ---------------------------------------------------------------- write_png


def test_write_png_round_trips_the_exact_pixels(tmp_path: Path) -> None:
    frame = noise_frames(1, 48, 80)[0]

    out = write_png(frame, tmp_path / "0.png")

    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.mode == "RGB"
        assert image.size == (80, 48)
        np.testing.assert_array_equal(np.asarray(image), frame)


# ---------------------------------------------------------------- thumbnails


@pytest.mark.parametrize(
    ("height", "width", "expected_size"),
    [
        (832, 480, (148, 256)),  # portrait: (width, height) as Pillow reports it
        (480, 832, (256, 148)),  # landscape
        (256, 256, (256, 256)),  # square
    ],
    ids=["portrait", "landscape", "square"],
)
def test_thumbnail_is_webp_with_longest_edge_256_and_aspect_kept(
    tmp_path: Path, height: int, width: int, expected_size: tuple[int, int]
) -> None:
    frames = moving_gradients(3, height, width)

    out = make_thumbnail(middle_frame(frames), tmp_path / "0.thumb.webp")

    data = out.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    with Image.open(out) as image:
        assert image.format == "WEBP"
        assert image.size == expected_size


def test_middle_frame_is_frame_len_over_two(tmp_path: Path) -> None:
    frames = numbered_frames(9, 32, 48)

    chosen = middle_frame(frames)

    np.testing.assert_array_equal(chosen, frames[4])
    out = make_thumbnail(chosen, tmp_path / "t.webp")
    with Image.open(out) as image:
        grey = np.asarray(image.convert("RGB")).astype(int).mean()
    assert abs(grey - 100) < 3, "the thumbnail shows the fifth of nine frames (grey 100)"


def test_middle_frame_of_an_even_count_is_the_later_of_the_two(tmp_path: Path) -> None:
    frames = numbered_frames(4, 8, 8)

    np.testing.assert_array_equal(middle_frame(frames), frames[2])


def test_middle_frame_of_an_image_is_its_only_frame() -> None:
    frames = numbered_frames(1, 8, 8)

    np.testing.assert_array_equal(middle_frame(frames), frames[0])


# ---------------------------------------------------------------- check_file


def test_check_file_passes_good_files_and_returns_their_size(
    good_mp4: Path, good_png: Path, good_webp: Path
) -> None:
    for path, kind in [(good_mp4, "mp4"), (good_png, "png"), (good_webp, "webp")]:
        assert check_file(path, kind) == path.stat().st_size


def test_mp4_top_level_boxes_lists_ftyp_moov_mdat_in_order(good_mp4: Path) -> None:
    boxes = mp4_top_level_boxes(good_mp4)

    assert [b for b in boxes if b in {"ftyp", "moov", "mdat"}] == ["ftyp", "moov", "mdat"]
    assert boxes == raw_top_level_boxes(good_mp4.read_bytes())


def test_check_file_refuses_a_missing_file_naming_it(tmp_path: Path) -> None:
    with pytest.raises(MediaCheckFailed, match="absent.mp4"):
        check_file(tmp_path / "absent.mp4", "mp4")


@pytest.mark.parametrize("kind", ["mp4", "png", "webp"])
def test_check_file_refuses_a_file_too_small_naming_it(tmp_path: Path, kind: str) -> None:
    path = write_bytes(tmp_path / f"tiny.{kind}", b"\0" * (MIN_BYTES[kind] - 1))

    with pytest.raises(MediaCheckFailed, match=rf"tiny\.{kind}.*too small"):
        check_file(path, kind)


def test_check_file_refuses_an_empty_file(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "empty.png", b"")

    with pytest.raises(MediaCheckFailed, match="empty.png"):
        check_file(path, "png")


def test_check_file_refuses_a_png_without_the_png_signature(tmp_path: Path, good_png: Path) -> None:
    data = good_png.read_bytes()
    path = write_bytes(tmp_path / "bad.png", b"\x89PNX" + data[4:])

    with pytest.raises(MediaCheckFailed, match=r"bad\.png.*PNG signature"):
        check_file(path, "png")


def test_check_file_refuses_a_png_passed_off_as_webp(tmp_path: Path, good_png: Path) -> None:
    path = write_bytes(tmp_path / "fake.webp", good_png.read_bytes())

    with pytest.raises(MediaCheckFailed, match=r"fake\.webp.*WEBP"):
        check_file(path, "webp")


def test_check_file_refuses_a_riff_that_is_not_webp(tmp_path: Path) -> None:
    wave = b"RIFF" + struct.pack("<I", 100) + b"WAVE" + b"\0" * 100
    path = write_bytes(tmp_path / "sound.webp", wave)

    with pytest.raises(MediaCheckFailed, match=r"sound\.webp"):
        check_file(path, "webp")


def test_check_file_refuses_an_mp4_without_ftyp_at_byte_4(tmp_path: Path, good_mp4: Path) -> None:
    data = bytearray(good_mp4.read_bytes())
    data[4:8] = b"free"
    path = write_bytes(tmp_path / "noftyp.mp4", bytes(data))

    with pytest.raises(MediaCheckFailed, match=r"noftyp\.mp4.*ftyp"):
        check_file(path, "mp4")


def test_check_file_refuses_a_png_passed_off_as_mp4(tmp_path: Path) -> None:
    path = write_png(noise_frames(1, 64, 64)[0], tmp_path / "picture.mp4")

    with pytest.raises(MediaCheckFailed, match=r"picture\.mp4"):
        check_file(path, "mp4")


def test_check_file_refuses_an_mp4_that_is_not_faststart(tmp_path: Path) -> None:
    path = encode_without_faststart(noise_frames(), tmp_path / "slow.mp4")
    data = path.read_bytes()
    boxes = raw_top_level_boxes(data)
    assert data[4:8] == b"ftyp" and len(data) >= MIN_BYTES["mp4"]
    assert boxes.index("mdat") < boxes.index("moov"), "precondition: moov written last"

    with pytest.raises(MediaCheckFailed, match=r"slow\.mp4.*not faststart"):
        check_file(path, "mp4")


def test_check_file_refuses_an_mp4_cut_short_before_its_moov(
    tmp_path: Path, good_mp4: Path
) -> None:
    data = good_mp4.read_bytes()
    ftyp_size = struct.unpack(">I", data[:4])[0]
    path = write_bytes(tmp_path / "cut.mp4", data[:ftyp_size] + b"\0" * 2048)

    with pytest.raises(MediaCheckFailed, match=r"cut\.mp4"):
        check_file(path, "mp4")


def split_boxes(data: bytes) -> dict[str, bytes]:
    """Each top-level box of a file with 32-bit box sizes, by name, header included."""
    boxes, offset = {}, 0
    while offset + 8 <= len(data):
        size, name = struct.unpack(">I4s", data[offset : offset + 8])
        boxes[name.decode("latin-1")] = data[offset : offset + size]
        offset += size
    return boxes


def test_check_file_refuses_an_mp4_cut_short_inside_mdat(tmp_path: Path, good_mp4: Path) -> None:
    data = good_mp4.read_bytes()
    path = write_bytes(tmp_path / "truncated.mp4", data[: len(data) - 500])

    with pytest.raises(MediaCheckFailed, match=r"truncated\.mp4.*cut short"):
        check_file(path, "mp4")


@pytest.mark.timeout(10)
def test_check_file_refuses_a_box_with_64_bit_size_zero_without_hanging(
    tmp_path: Path, good_mp4: Path
) -> None:
    boxes = split_boxes(good_mp4.read_bytes())
    bogus = struct.pack(">I4sQ", 1, b"mdat", 0) + boxes["mdat"][8:]
    path = write_bytes(tmp_path / "loop.mp4", boxes["ftyp"] + boxes["moov"] + bogus)

    with pytest.raises(MediaCheckFailed, match=r"loop\.mp4.*mdat"):
        check_file(path, "mp4")


def test_check_file_reads_a_64_bit_mdat_size(tmp_path: Path, good_mp4: Path) -> None:
    boxes = split_boxes(good_mp4.read_bytes())
    payload = boxes["mdat"][8:]
    large = struct.pack(">I4sQ", 1, b"mdat", 16 + len(payload)) + payload
    path = write_bytes(tmp_path / "large.mp4", boxes["ftyp"] + boxes["moov"] + large)

    assert mp4_top_level_boxes(path) == ["ftyp", "moov", "mdat"]
    assert check_file(path, "mp4") == path.stat().st_size


def test_check_file_accepts_an_mdat_running_to_the_end_of_the_file(
    tmp_path: Path, good_mp4: Path
) -> None:
    boxes = split_boxes(good_mp4.read_bytes())
    to_the_end = struct.pack(">I4s", 0, b"mdat") + boxes["mdat"][8:]
    path = write_bytes(tmp_path / "open.mp4", boxes["ftyp"] + boxes["moov"] + to_the_end)

    assert mp4_top_level_boxes(path) == ["ftyp", "moov", "mdat"]
    assert check_file(path, "mp4") == path.stat().st_size


# ---------------------------------------------------------------- spool


def test_spooled_frames_read_back_equal(tmp_path: Path) -> None:
    frames = moving_gradients()
    path = frames_path(tmp_path / "spool", "job-1")

    write_frames(path, frames)

    read = read_frames(path)
    assert read.dtype == np.uint8
    assert read.shape == frames.shape
    np.testing.assert_array_equal(read, frames)
    assert np.load(path).tobytes() == frames.tobytes(), "a plain .npy any reader can open"


def test_write_frames_leaves_no_partial_file_behind(tmp_path: Path) -> None:
    path = frames_path(tmp_path / "spool", "job-1")

    write_frames(path, moving_gradients(2))

    assert sorted(p.name for p in path.parent.iterdir()) == ["frames.npy"]
    assert not list(tmp_path.rglob("*.partial*"))


def test_write_frames_overwrites_an_earlier_spool_file(tmp_path: Path) -> None:
    path = frames_path(tmp_path / "spool", "job-1")
    write_frames(path, numbered_frames(3, 8, 8))

    write_frames(path, numbered_frames(1, 8, 8))

    assert read_frames(path).shape == (1, 8, 8, 3)


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((2, 8, 8, 3), dtype=np.float32),
        np.zeros((2, 8, 8, 3), dtype=np.uint16),
        np.zeros((8, 8, 3), dtype=np.uint8),
        np.zeros((2, 8, 8, 4), dtype=np.uint8),
        np.zeros((2, 3, 8, 8), dtype=np.uint8),
    ],
    ids=["float32", "uint16", "no-frame-axis", "rgba", "channels-first"],
)
def test_write_frames_refuses_wrong_dtype_or_shape(tmp_path: Path, frames: np.ndarray) -> None:
    path = frames_path(tmp_path / "spool", "job-1")

    with pytest.raises(ValueError, match=r"uint8 \(F, H, W, 3\)"):
        write_frames(path, frames)

    assert not path.exists()


def test_remove_job_removes_the_job_directory_and_only_it(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    write_frames(frames_path(spool, "job-1"), moving_gradients(1))
    write_frames(frames_path(spool, "job-2"), moving_gradients(1))
    (job_dir(spool, "job-1") / "0.mp4").write_bytes(b"video")

    remove_job(spool, "job-1")

    assert not job_dir(spool, "job-1").exists()
    assert frames_path(spool, "job-2").is_file()


def test_remove_job_of_an_unknown_job_is_harmless(tmp_path: Path) -> None:
    # Given a spool holding another job, and one that never had a spool at all
    spool = tmp_path / "spool"
    write_frames(frames_path(spool, "job-2"), moving_gradients(1))

    # When the unknown job's spool is removed (a job that failed before generation)
    remove_job(spool, "never-existed")
    remove_job(tmp_path / "no-spool-yet", "never-existed")

    # Then nothing is raised, and the spool and the other job are untouched
    assert [p.name for p in spool.iterdir()] == ["job-2"]
    np.testing.assert_array_equal(read_frames(frames_path(spool, "job-2")), moving_gradients(1))
    assert not (tmp_path / "no-spool-yet").exists()


def spooled_windows(directory: Path, sizes: list[int]) -> np.ndarray:
    """A long video written window by window as generation writes it; the whole video."""
    video = moving_gradients(sum(sizes), height=32, width=48)
    first = 0
    for number, size in enumerate(sizes, start=1):
        write_window(directory, number, video[first : first + size])
        first += size
    return video


def test_a_long_videos_windows_read_back_as_one_video(tmp_path: Path) -> None:
    windows = windows_dir(tmp_path / "spool", "job-1")
    video = spooled_windows(windows, [9, 4, 4])

    read = read_frames(windows)

    assert read.shape == video.shape == (17, 32, 48, 3) and len(read) == 17
    np.testing.assert_array_equal(np.stack(list(read)), video)
    for index in (0, 8, 9, 12, 13, 16, -1, -17):
        np.testing.assert_array_equal(read[index], video[index])
    with pytest.raises(IndexError):
        read[17]
    np.testing.assert_array_equal(read.tail(6), video[-6:])  # across two windows
    np.testing.assert_array_equal(read.tail(30), video)
    np.testing.assert_array_equal(middle_frame(read), video[8])


def test_only_the_windows_written_without_a_gap_count(tmp_path: Path) -> None:
    windows = tmp_path / "windows"
    spooled_windows(windows, [5, 4])
    write_window(windows, 4, moving_gradients(4, height=32, width=48))  # 3 is missing

    assert windows_written(windows) == 2
    assert len(read_frames(windows)) == 9
    remove_windows(windows)
    assert windows_written(windows) == 0 and not windows.exists()


def test_a_long_video_encodes_from_its_windows_frame_for_frame(tmp_path: Path) -> None:
    windows = tmp_path / "windows"
    video = spooled_windows(windows, [9, 4, 4])

    encoded = encode_mp4(read_frames(windows), tmp_path / "video.mp4", fps=FPS)

    _, decoded = decode_video(encoded)
    assert len(decoded) == 17
    for index, frame in enumerate(decoded):  # each frame is its own source frame, in order
        pixels = frame.to_ndarray(format="rgb24").astype(int)
        errors = [np.abs(pixels - source).mean() for source in video]
        assert int(np.argmin(errors)) == index and errors[index] < 8


# ---------------------------------------------------------------- storage


def test_local_upload_writes_root_bucket_key_with_the_same_bytes(
    tmp_path: Path, good_png: Path
) -> None:
    storage = LocalStorage(tmp_path / "out")

    storage.upload("workspace-temp", "user-1/job-1/0.png", good_png, content_type="image/png")

    target = tmp_path / "out" / "workspace-temp" / "user-1" / "job-1" / "0.png"
    assert target.read_bytes() == good_png.read_bytes()


def test_local_upload_a_second_time_overwrites_and_leaves_no_partial(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    first = write_bytes(tmp_path / "first.bin", b"first version, longer than the second")
    second = write_bytes(tmp_path / "second.bin", b"second")
    key = "user-1/job-1/0.mp4"

    storage.upload("workspace-temp", key, first, content_type="video/mp4")
    storage.upload("workspace-temp", key, second, content_type="video/mp4")

    folder = tmp_path / "out" / "workspace-temp" / "user-1" / "job-1"
    assert (folder / "0.mp4").read_bytes() == b"second"
    assert [p.name for p in folder.iterdir()] == ["0.mp4"]


def test_make_storage_local_writes_under_output_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STORAGE_BACKEND", raising=False)
    settings = Settings(storage_backend="local", output_dir=tmp_path / "out", _env_file=None)

    storage = make_storage(settings)

    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path / "out"


@pytest.mark.parametrize(
    "present",
    [{}, {"SUPABASE_SERVICE_KEY": "key"}, {"SUPABASE_URL": "http://127.0.0.1:1"}],
    ids=["neither", "key-only", "url-only"],
)
def test_make_storage_supabase_without_url_or_key_names_the_variables(
    monkeypatch: pytest.MonkeyPatch, present: dict[str, str]
) -> None:
    for name in ("SUPABASE_URL", "SUPABASE_SERVICE_KEY", "STORAGE_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    for name, value in present.items():
        monkeypatch.setenv(name, value)
    settings = Settings(storage_backend="supabase", _env_file=None)

    with pytest.raises(ValueError, match="SUPABASE_URL") as raised:
        make_storage(settings)

    assert "SUPABASE_SERVICE_KEY" in str(raised.value)
