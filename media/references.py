"""Reference images: safe download, safe decoding, preparation to the job's size.

Knows no models and no Celery. A reference URL is user input pointing anywhere, so:
- only http(s); the host is resolved once and every address it gives is checked: loopback,
  private, link-local, multicast, cloud-metadata and other non-public addresses are refused
  unless `REFERENCE_ALLOWED_HOSTS` names the host (or the address itself);
- the connection goes to the address that was checked (the URL's host is kept in the Host
  header and TLS SNI), and the peer address of the open socket is compared with it, so a
  DNS answer that changes between check and connect (rebinding) cannot pass; every
  redirect hop goes through the same check;
- the body is streamed with a byte cap and a deadline; the format is sniffed from the
  bytes (PNG, JPEG, WEBP), the pixel size is checked from the header before any pixel is
  decoded, and Pillow's decompression-bomb guard stays on.

`TransientError` (timeouts, connection errors, 429, 5xx) is worth a retry;
`ReferenceUnusable` is final and names the reason.
"""

from __future__ import annotations

import io
import ipaddress
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from PIL import Image, ImageOps

from worker.errors import ReferenceUnusable, TransientError, error_for_status

#: Largest reference body, bytes (CONTRACT.md section 5).
MAX_BYTES = 20 * 1024 * 1024
#: Largest reference image side, pixels (CONTRACT.md section 5).
MAX_SIDE_PX = 4096
#: Redirect hops followed, each checked like the first request.
MAX_REDIRECTS = 5
#: Cloud metadata endpoints (AWS/GCP/Azure, AWS IPv6, ECS, Alibaba), named in refusals.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)
#: Address kinds refused, checked in this order (0.0.0.0 is also "private" to ipaddress).
REFUSED_KINDS = {
    "is_unspecified": "an unspecified address",
    "is_loopback": "a loopback address",
    "is_link_local": "a link-local address",
    "is_multicast": "a multicast address",
    "is_private": "a private address",
    "is_reserved": "a reserved address",
}
#: The formats accepted, by their first bytes; WEBP is `RIFF....WEBP`.
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
_CHUNK_BYTES = 64 * 1024

#: (host, port) -> the addresses it resolves to, in the resolver's order.
Resolver = Callable[[str, int], list[str]]


def system_resolve(host: str, port: int) -> list[str]:
    """The system resolver's addresses for a host; a DNS failure is final for this URL."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ReferenceUnusable(f"host {host!r} does not resolve: {e.strerror}") from e
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def refusal(address: str) -> str | None:
    """Why an address must not be contacted, or None for a public address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for kind, reason in REFUSED_KINDS.items():
        if getattr(ip, kind):
            return reason
    if not ip.is_global:
        return "not a public address"
    return None


def parse_hosts(text: str) -> frozenset[str]:
    """`REFERENCE_ALLOWED_HOSTS`: a comma list of host names or addresses."""
    return frozenset(h.strip().lower().strip("[]") for h in text.split(",") if h.strip())


@dataclass(frozen=True)
class Guard:
    """Decides which address a URL may be fetched from, or refuses it."""

    allowed_hosts: frozenset[str] = frozenset()
    resolve: Resolver = field(default=system_resolve)

    def address_for(self, url: httpx.URL) -> str:
        """The one address to connect to for `url`; ReferenceUnusable if it must not be."""
        if url.scheme not in ("http", "https"):
            raise ReferenceUnusable(f"scheme {url.scheme!r} is not allowed: http(s) only")
        host = url.host.lower()
        if not host:
            raise ReferenceUnusable("the URL has no host")
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            addresses = self.resolve(host, url.port or (443 if url.scheme == "https" else 80))
        if not addresses:
            raise ReferenceUnusable(f"host {host!r} resolves to no address")
        if host not in self.allowed_hosts:
            for address in addresses:
                reason = refusal(address)
                if reason and address not in self.allowed_hosts:
                    raise ReferenceUnusable(
                        f"host {host!r} is {address}, {reason}, and REFERENCE_ALLOWED_HOSTS "
                        "does not name it: refused before connecting"
                    )
        return addresses[0]


def fetch(url: str, *, guard: Guard, timeout_s: float, max_bytes: int = MAX_BYTES) -> bytes:
    """Download one reference under the guard, following checked redirects."""
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL as e:
        raise ReferenceUnusable(f"not a valid URL: {e}") from e
    deadline = time.monotonic() + timeout_s
    # trust_env=False: a proxy from the environment would connect somewhere unchecked.
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            address = guard.address_for(target)
            request = client.build_request(
                "GET",
                target.copy_with(host=address),
                headers={"Host": target.netloc.decode("ascii"), "Accept": "image/*"},
                extensions={"sni_hostname": target.host},
            )
            try:
                response = client.send(request, stream=True)
            except httpx.TransportError as e:  # timeouts, refused connections, resets
                raise TransientError(f"reference {target.host}: {type(e).__name__}: {e}") from e
            try:
                _check_peer(response, address)
                if not response.is_redirect:
                    return _body(response, host=target.host, max_bytes=max_bytes, deadline=deadline)
                target = target.join(response.headers["location"])
            finally:
                response.close()
    raise ReferenceUnusable(f"more than {MAX_REDIRECTS} redirects")


def _check_peer(response: httpx.Response, address: str) -> None:
    """The socket's peer must be the address checked (it is, unless something rerouted it)."""
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    if peer is None or ipaddress.ip_address(peer[0]) != ipaddress.ip_address(address):
        raise ReferenceUnusable(f"connected to {peer}, not to the checked address {address}")


def _body(response: httpx.Response, *, host: str, max_bytes: int, deadline: float) -> bytes:
    """The body of a final answer, streamed under the byte cap and the deadline."""
    if response.is_error:
        error = error_for_status(response.status_code, f"reference {host}")
        raise error if isinstance(error, TransientError) else ReferenceUnusable(str(error))
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdecimal() and int(declared) > max_bytes:
        raise ReferenceUnusable(
            f"Content-Length {int(declared)} bytes is over the limit of {max_bytes}"
        )
    body = bytearray()
    try:
        for chunk in response.iter_bytes(_CHUNK_BYTES):
            body += chunk
            if len(body) > max_bytes:
                raise ReferenceUnusable(f"body is over the limit of {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise TransientError("reference download took longer than its deadline")
    except httpx.TransportError as e:
        raise TransientError(f"reference body: {type(e).__name__}: {e}") from e
    return bytes(body)


def sniff(data: bytes) -> str | None:
    """The image format from the first bytes, whatever the URL or Content-Type say."""
    for signature, name in SIGNATURES.items():
        if data.startswith(signature):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode(data: bytes, *, max_side_px: int = MAX_SIDE_PX) -> Image.Image:
    """Decode PNG/JPEG/WEBP bytes to an upright RGB image; ReferenceUnusable otherwise."""
    kind = sniff(data)
    if kind is None:
        raise ReferenceUnusable(f"not a PNG, JPEG or WEBP image (starts with {data[:8]!r})")
    try:
        with warnings.catch_warnings():
            # Pillow warns, then raises, on bombs; a reference gets no second chance.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[kind])
            width, height = image.size  # from the header: nothing decoded yet
            if width > max_side_px or height > max_side_px:
                raise ReferenceUnusable(
                    f"{width}x{height} pixels is over the limit of {max_side_px}x{max_side_px}"
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ReferenceUnusable(f"refused by the decompression-bomb guard: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ReferenceUnusable(f"{kind} cannot be decoded: {e}") from e
    return _to_rgb(ImageOps.exif_transpose(image))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Transparency is flattened onto white (the platform shows references on white)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def prepare(image: Image.Image, *, width: int, height: int) -> Image.Image:
    """Scale to cover the job's size and cut the middle (`resize_policy: center_crop`).

    Never letterboxed: black bars would become part of the conditioning.
    """
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def load_references(
    urls: dict[str, str], *, width: int, height: int, guard: Guard, timeout_s: float
) -> dict[str, Image.Image]:
    """Every reference of a job, prepared; the first failure names its role."""
    images = {}
    for role, url in urls.items():
        try:
            images[role] = prepare(
                decode(fetch(url, guard=guard, timeout_s=timeout_s)), width=width, height=height
            )
        except (ReferenceUnusable, TransientError) as e:
            raise type(e)(f"{role} reference: {e}") from e
    return images
