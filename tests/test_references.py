"""Reference download, SSRF guard, decoding and preparation, against real local HTTP servers.

Only 127.0.0.0/8 is ever contacted: 127.0.0.1 is allow-listed, 127.0.0.2 plays the refused
internal host and its request log proves that nothing reached it. 10.0.0.1 and
169.254.169.254 must be refused before any connection is tried, which the reason proves.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from media import references
from media.references import Guard, decode, fetch, load_references, prepare
from worker.errors import ReferenceUnusable, TransientError
from worker.local.image_server import ImageServer, Route

ALLOWED = Guard(allowed_hosts=frozenset({"127.0.0.1"}))
TIMEOUT_S = 5.0


def image_bytes(image: Image.Image, kind: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries one row: big only if someone decodes it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * (1 + 3 * 16)))
        + chunk(b"IEND", b"")
    )


RED = image_bytes(Image.new("RGB", (64, 32), (255, 0, 0)))


@pytest.fixture(scope="module")
def server() -> Iterator[ImageServer]:
    with ImageServer("127.0.0.1") as local:
        yield local


@pytest.fixture(scope="module")
def internal() -> Iterator[ImageServer]:
    """A server on an address the guard refuses: it must never see a request."""
    with ImageServer("127.0.0.2") as local:
        local.add("/secret.png", Route(RED, "image/png"))
        yield local


def test_an_allow_listed_loopback_host_is_fetched(server: ImageServer) -> None:
    url = server.add("/red.png", Route(RED, "image/png"))
    assert fetch(url, guard=ALLOWED, timeout_s=TIMEOUT_S) == RED


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254, a cloud metadata address"),
        ("http://10.0.0.1/ref.png", "10.0.0.1, a private address"),
        ("http://[::1]/ref.png", "::1, a loopback address"),
        ("http://[::ffff:10.0.0.1]/ref.png", "a private address"),
        ("http://224.0.0.1/ref.png", "a multicast address"),
        ("http://0.0.0.0/ref.png", "an unspecified address"),
        ("file:///etc/passwd", "scheme 'file' is not allowed: http(s) only"),
        ("ftp://127.0.0.1/ref.png", "scheme 'ftp' is not allowed"),
    ],
    ids=["metadata", "private-10", "ipv6-loopback", "mapped-private", "multicast",
         "unspecified", "file", "ftp"],
)  # fmt: skip
def test_refused_addresses_and_schemes_are_refused_before_connecting(url: str, reason: str) -> None:
    # The reason comes from the guard, which runs before any socket is opened: an attempt
    # to connect to 10.0.0.1 or 169.254.169.254 would end in a TransientError instead.
    with pytest.raises(ReferenceUnusable) as refused:
        fetch(url, guard=ALLOWED, timeout_s=TIMEOUT_S)
    assert reason in str(refused.value)


def test_a_loopback_address_not_allow_listed_gets_no_request(internal: ImageServer) -> None:
    with pytest.raises(ReferenceUnusable, match="127.0.0.2, a loopback address"):
        fetch(internal.url("/secret.png"), guard=ALLOWED, timeout_s=TIMEOUT_S)
    assert internal.requests == []


def test_the_allow_list_names_the_host_that_may_be_private(internal: ImageServer) -> None:
    guard = Guard(allowed_hosts=references.parse_hosts(" 127.0.0.1, 127.0.0.2 "))
    assert fetch(internal.url("/secret.png"), guard=guard, timeout_s=TIMEOUT_S) == RED
    internal.requests.clear()


def test_a_redirect_to_a_refused_address_is_refused_at_that_hop(
    server: ImageServer, internal: ImageServer
) -> None:
    url = server.add("/hop.png", Route(status=302, location=internal.url("/secret.png"), body=b""))
    with pytest.raises(ReferenceUnusable, match="127.0.0.2, a loopback address"):
        fetch(url, guard=ALLOWED, timeout_s=TIMEOUT_S)
    assert server.requests_for("/hop.png") == 1
    assert internal.requests == []


def test_a_redirect_to_an_allowed_place_is_followed(server: ImageServer) -> None:
    server.add("/final.png", Route(RED, "image/png"))
    url = server.add("/moved.png", Route(status=301, location="/final.png"))
    assert fetch(url, guard=ALLOWED, timeout_s=TIMEOUT_S) == RED


def test_a_redirect_loop_ends(server: ImageServer) -> None:
    url = server.add("/loop.png", Route(status=302, location="/loop.png"))
    with pytest.raises(ReferenceUnusable, match="more than 5 redirects"):
        fetch(url, guard=ALLOWED, timeout_s=TIMEOUT_S)


def test_a_name_is_resolved_once_and_the_checked_address_is_the_one_connected_to(
    server: ImageServer, internal: ImageServer
) -> None:
    # Given a DNS answer that flips to a refused address after the first lookup (rebinding)
    answers = iter([["127.0.0.1"], ["127.0.0.2"], ["127.0.0.2"]])
    lookups = []

    def rebinding(host: str, port: int) -> list[str]:
        lookups.append(host)
        return next(answers)

    guard = Guard(allowed_hosts=frozenset({"127.0.0.1"}), resolve=rebinding)
    server.add("/red.png", Route(RED, "image/png"))

    # When a URL naming that host is fetched
    data = fetch(f"http://rebind.test:{server.port}/red.png", guard=guard, timeout_s=TIMEOUT_S)

    # Then it came from the address that was checked, and the flipped answer was never used
    assert data == RED
    assert lookups == ["rebind.test"]
    assert internal.requests == []


def test_a_name_resolving_to_a_refused_address_is_refused(internal: ImageServer) -> None:
    guard = Guard(allowed_hosts=frozenset({"127.0.0.1"}), resolve=lambda h, p: ["127.0.0.2"])
    with pytest.raises(ReferenceUnusable, match="'images.test' is 127.0.0.2, a loopback"):
        fetch(f"http://images.test:{internal.port}/secret.png", guard=guard, timeout_s=TIMEOUT_S)
    assert internal.requests == []


@pytest.mark.parametrize("length", [True, False], ids=["declared", "streamed"])
def test_a_body_over_20_mb_is_refused(server: ImageServer, length: bool) -> None:
    big = RED + b"\x00" * (30 * 1024 * 1024)
    url = server.add(f"/big-{length}.png", Route(big, "image/png", length=length))
    with pytest.raises(ReferenceUnusable, match="over the limit of 20971520"):
        fetch(url, guard=ALLOWED, timeout_s=TIMEOUT_S)


@pytest.mark.parametrize(
    ("status", "error"), [(503, TransientError), (429, TransientError), (404, ReferenceUnusable)]
)
def test_http_errors_are_sorted_into_retry_or_give_up(
    server: ImageServer, status: int, error: type[Exception]
) -> None:
    url = server.add(f"/status-{status}.png", Route(status=status, body=b"no"))
    with pytest.raises(error, match=f"HTTP {status}"):
        fetch(url, guard=ALLOWED, timeout_s=TIMEOUT_S)


def test_a_closed_port_is_transient() -> None:
    with ImageServer("127.0.0.1") as gone:
        url = gone.url("/x.png")
    with pytest.raises(TransientError, match="ConnectError"):
        fetch(url, guard=ALLOWED, timeout_s=TIMEOUT_S)


# --- Decoding -----------------------------------------------------------------------------


def test_an_image_of_20000x20000_is_refused_from_its_header() -> None:
    data = png_header_only(20_000, 20_000)
    started = time.process_time()  # CPU time: a loaded machine's waits do not count
    with pytest.raises(ReferenceUnusable, match="20000x20000|decompression-bomb"):
        decode(data)
    assert time.process_time() - started < 1  # decoding 400 Mpx would take far longer


def test_an_image_just_over_4096_is_refused() -> None:
    with pytest.raises(ReferenceUnusable, match="4097x16 pixels is over the limit of 4096x4096"):
        decode(png_header_only(4097, 16))


def test_html_served_as_a_png_is_refused_by_content() -> None:
    with pytest.raises(ReferenceUnusable, match="not a PNG, JPEG or WEBP image"):
        decode(b"<!doctype html><html><body>login</body></html>")


def test_a_truncated_jpeg_is_refused() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = image_bytes(Image.fromarray(noise), "JPEG", quality=90)
    with pytest.raises(ReferenceUnusable, match="JPEG cannot be decoded"):
        decode(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "WEBP"])
def test_each_accepted_format_decodes_whatever_it_is_called(kind: str) -> None:
    data = image_bytes(Image.new("RGB", (40, 20), (0, 0, 255)), kind)
    image = decode(data)
    assert (image.mode, image.size) == ("RGB", (40, 20))
    assert image.getpixel((20, 10))[2] > 240


def test_gif_is_not_accepted() -> None:
    with pytest.raises(ReferenceUnusable, match="not a PNG, JPEG or WEBP"):
        decode(image_bytes(Image.new("RGB", (8, 8)), "GIF"))


def test_exif_orientation_is_applied() -> None:
    # A 40x20 landscape picture tagged "rotate 90 CW" (orientation 6) is upright 20x40
    exif = Image.Exif()
    exif[0x0112] = 6
    data = image_bytes(Image.new("RGB", (40, 20), (200, 10, 10)), "JPEG", exif=exif.tobytes())
    assert decode(data).size == (20, 40)


def test_transparency_and_palettes_are_flattened_to_rgb_on_white() -> None:
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    palette = Image.new("RGB", (8, 8), (10, 200, 10)).convert("P")
    assert decode(image_bytes(clear)).getpixel((4, 4)) == (255, 255, 255)
    flattened = decode(image_bytes(palette))
    assert flattened.mode == "RGB" and flattened.getpixel((4, 4))[1] > 180


# --- Preparation --------------------------------------------------------------------------


def pattern_1000x500() -> Image.Image:
    """Red encodes x (x // 4), green encodes y (y // 2): every pixel says where it came from."""
    y, x = np.mgrid[0:500, 0:1000]
    rgb = np.stack([x // 4, y // 2, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def test_a_wide_reference_is_centre_cropped_to_the_job_size_never_letterboxed() -> None:
    prepared = np.asarray(prepare(pattern_1000x500(), width=256, height=256)).astype(int)

    assert prepared.shape == (256, 256, 3)
    # The 500 px height is scaled to 256 (1000 -> 512 wide); the middle 256 columns are
    # the source's x = 250..750, so red runs from about 250/4 to 750/4 ...
    assert abs(prepared[:, 2, 0].mean() - 250 / 4) < 3
    assert abs(prepared[:, -3, 0].mean() - 750 / 4) < 3
    # ... and every source row is kept: green spans top to bottom, with no black bars.
    assert prepared[2, :, 1].mean() < 4 and prepared[-3, :, 1].mean() > 244
    assert prepared[..., 2].min() > 120  # a letterbox bar would be black (0) here


def test_a_tall_reference_is_cropped_top_and_bottom() -> None:
    tall = pattern_1000x500().transpose(Image.Transpose.TRANSPOSE)  # 500x1000
    prepared = np.asarray(prepare(tall, width=256, height=384)).astype(int)
    assert prepared.shape == (384, 256, 3)
    assert prepared[..., 2].min() > 120


def test_load_references_downloads_decodes_and_prepares_each_role(server: ImageServer) -> None:
    url = server.add("/pattern.jpg", Route(image_bytes(pattern_1000x500()), "image/jpeg"))
    images = load_references(
        {"start": url}, width=256, height=256, guard=ALLOWED, timeout_s=TIMEOUT_S
    )
    assert list(images) == ["start"] and images["start"].size == (256, 256)


def test_load_references_names_the_role_that_failed(server: ImageServer) -> None:
    ok = server.add("/ok.png", Route(RED, "image/png"))
    html = server.add("/page.png", Route(b"<html></html>", "image/png"))
    with pytest.raises(ReferenceUnusable, match="^end reference: not a PNG"):
        load_references(
            {"start": ok, "end": html}, width=256, height=256, guard=ALLOWED, timeout_s=TIMEOUT_S
        )
