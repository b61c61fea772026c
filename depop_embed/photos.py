"""Reading and decoding listing photos: untrusted user uploads.

A photo that cannot be read or decoded raises `PhotoError` with a short reason code, which the encoder
turns into an error row (`code: message`); it never takes the batch down. Codes in `TRANSIENT_CODES`
name failures that may pass on a later run (a timeout, a 5xx), as opposed to a photo that is bad.

Nothing is trusted before it is bounded: reading stops as soon as a photo passes
`images.fetch.max_bytes`, and the header is checked before any pixel is decoded (decompression bombs):
a JPEG over `encode.max_image_pixels` is decoded at a reduced scale (draft mode), any other format over
it is refused, and so is an image too elongated for open_clip's resize.

Draft mode also serves speed: a JPEG much larger than the model's input is decoded at 1/2, 1/4 or 1/8
scale (libjpeg scales in the DCT, far cheaper than a full decode and resize).

This module is the host's half of the photo path and stops at RGB uint8 pixels (`decode_pixels`): no
resize or float work happens here. The model's own resize, crop and normalisation run as a batch on
the model's device (`encoders.Encoder.photo_input`). `jpeg_for_device` goes one step further for
JPEGs whose header passes every check: it decodes nothing and leaves the bytes to the device's decoder.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import math
import socket
import time
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlparse, urlsplit

import numpy as np
from PIL import ExifTags, Image, ImageOps

from depop_embed import __version__
from depop_embed.config import FetchConfig
from depop_embed.uri_rules import FORBIDDEN, UriRules, check_uri, refused, resolve

# Failures that say nothing about the photo itself: the same URI may well work on the next run
# (read_failed: an I/O error from a volume or an object store). Incremental runs retry these, and keep
# a stored good vector rather than overwrite it with one of them (`selection`).
TRANSIENT_CODES = frozenset({"timeout", "connection", "truncated", "http_5xx", "rate_limited", "read_failed"})

# The formats photos arrive in (JPEG includes phones' multi-picture MPO; AVIF where this Pillow reads
# it). Pillow can open many more (EPS runs Ghostscript, PSD, ICO, ...): none of them is a photo upload,
# and each is more parser surface for hostile bytes.
Image.init()
PHOTO_FORMATS = tuple(f for f in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF") if f in Image.OPEN)

# open_clip's transform scales the shorter side to the model's input size before it crops: a 141-byte
# 20000x1 PNG would become 224x4,480,000 pixels (4 GB). No photo is this elongated; panoramas are ~10:1.
MAX_ASPECT_RATIO = 20

# Content types an image server may send for image bytes (object stores often send octet-stream).
_IMAGE_CONTENT_TYPES = ("application/octet-stream", "binary/octet-stream")
_CHUNK = 1 << 16
_REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 3

# A draft-decoded JPEG keeps both sides at least this many times the model's input side, so the
# bicubic resize that follows still averages several source pixels per output pixel. Measured on the
# sample catalogue with ViT-B-32: cosine to the full decode >= 0.99995 at 1.4x, down to 0.9998 at 1x.
DRAFT_MARGIN = 1.4

# JPEG header modes a device decoder turns into the same RGB as Pillow: YCbCr/RGB and greyscale.
# CMYK (inverted Adobe CMYK included) stays with Pillow, whose conversion this job's vectors follow.
_DEVICE_JPEG_MODES = ("RGB", "L")
_JPEG_END = b"\xff\xd9"  # the EOI marker: a file without it was cut short


class PhotoError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.detail = message


def is_transient(error: str | None) -> bool:
    """Whether an `error` column value (`code: message`) is a failure that may pass on a rerun."""
    return bool(error) and error.partition(":")[0].strip() in TRANSIENT_CODES


def is_refused(error: str | None) -> bool:
    """Whether an `error` column value is a photo URI the rules refused to open (`uri_rules`)."""
    return bool(error) and error.partition(":")[0].strip() == FORBIDDEN


def local_path(uri: str) -> str | None:
    """The filesystem path of a plain path or file: URI; None for other schemes."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a Windows drive letter is a path
        return uri
    return None


def read_bytes(uri: str, fetch: FetchConfig, rules: UriRules) -> bytes:
    """The photo's bytes, from a path, a file: URI, an http(s) URL or an fsspec object-store URI, once
    `rules` allow it (else forbidden_uri, before anything is opened or requested)."""
    if not uri:
        raise PhotoError("missing", "the photo row has no uri")
    try:
        target = check_uri(uri, rules)
        if urlparse(target).scheme in ("http", "https"):
            return _fetch_with_retries(target, fetch, rules)
    except PhotoError as exc:
        if exc.code == FORBIDDEN:  # the same words for the row's URI, whichever hop or address was refused
            raise refused(uri) from None
        raise
    path = local_path(uri)
    try:
        if path is not None:
            stream = open(target, "rb")  # the real path that was checked, not the row's spelling of it
        else:
            import fsspec  # object stores (s3://, gs://, abfss://...) through whatever fsspec backend is installed

            stream = fsspec.open(target, "rb")
        with stream as fh:  # a special file (/dev/zero, a pipe) has no size to check up front: cap the read
            return _read_capped(fh, fetch.max_bytes, uri)
    except FileNotFoundError as exc:
        raise PhotoError("missing", f"no file at {uri}") from exc
    except (ImportError, ValueError) as exc:
        raise PhotoError("unsupported_uri", f"{uri}: {exc}") from exc
    except OSError as exc:
        raise PhotoError("read_failed", f"{uri}: {exc}") from exc


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, max_pixels: int, input_side: int = 0) -> Image.Image:
    """Bytes -> an RGB image as a phone shows it: the first frame, EXIF orientation applied,
    transparency composited on white, 16-bit samples scaled to 8 bits, at most `max_pixels` pixels.

    With `input_side` (the model's input size), a JPEG is decoded at the smallest draft scale that
    keeps both its sides at least `DRAFT_MARGIN * input_side`.
    """
    if not data:
        raise PhotoError("empty", "zero-byte file")
    try:
        image = Image.open(io.BytesIO(data), formats=PHOTO_FORMATS)
        _check_shape(image)
        _reduce(image, max_pixels, math.ceil(DRAFT_MARGIN * input_side))
        image.load()  # animated GIF/WebP: open() stands on the first frame and load() decodes only that
        _apply_orientation(image)
        return _to_rgb(image)
    except PhotoError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard, at twice Image.MAX_IMAGE_PIXELS
        raise PhotoError("too_large", str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        formats = ", ".join(PHOTO_FORMATS)
        raise PhotoError("unsupported_format", f"not a photo format this job reads ({formats})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # Pillow's errors for corrupt files
        raise PhotoError("corrupt", f"{type(exc).__name__}: {exc}") from exc


def decode_pixels(data: bytes, max_pixels: int, input_side: int = 0) -> np.ndarray:
    """`decode`, as an (H, W, 3) uint8 array: what the host hands the model's device."""
    return np.asarray(decode(data, max_pixels, input_side))


@dataclass(frozen=True)
class DeviceJpeg:
    """A JPEG whose header passed every check `decode` makes, left for the model's device to decode
    (`encoders.Encoder.photo_input`). `decode_on_host` is the way back when the device decoder refuses it."""

    data: bytes
    width: int
    height: int
    orientation: int  # EXIF orientation 1..8, applied after the device decode
    max_pixels: int
    input_side: int

    def decode_on_host(self) -> np.ndarray:
        return decode_pixels(self.data, self.max_pixels, self.input_side)


def jpeg_for_device(data: bytes, max_pixels: int, input_side: int = 0) -> DeviceJpeg | None:
    """A `DeviceJpeg` for a plain RGB or greyscale JPEG under the pixel cap that ends where a JPEG ends;
    None for anything else (decode it with `decode_pixels`). Raises `PhotoError` for what `decode` would
    refuse from the header (an elongated image), so both paths give the same error rows."""
    if not data.startswith(b"\xff\xd8") or not data.rstrip(b"\0").endswith(_JPEG_END):
        return None  # not a JPEG, or a truncated one: Pillow gives the reason code
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG",))
        _check_shape(image)
        if image.format != "JPEG" or image.mode not in _DEVICE_JPEG_MODES or image.size[0] * image.size[1] > max_pixels:
            return None
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except PhotoError:
        raise
    except Exception:  # noqa: BLE001 - an odd header or EXIF block: Pillow decodes it and says what is wrong
        return None
    return DeviceJpeg(data, *image.size, orientation if orientation in range(1, 9) else 1, max_pixels, input_side)


def _fetch_with_retries(uri: str, fetch: FetchConfig, rules: UriRules) -> bytes:
    attempt = 0
    while True:
        try:
            return _fetch(uri, fetch, rules)
        except PhotoError as exc:
            if exc.code not in TRANSIENT_CODES:
                raise
            if attempt == fetch.retries:
                raise PhotoError(exc.code, f"{exc.detail} (after {attempt + 1} attempts)") from exc
        time.sleep(fetch.backoff_s * 2**attempt)
        attempt += 1


def _fetch(uri: str, fetch: FetchConfig, rules: UriRules) -> bytes:
    """One GET, following at most MAX_REDIRECTS redirects, each hop checked like the first: status,
    content type and size checked before the body; the body within the timeout."""
    deadline = time.monotonic() + fetch.timeout_s
    url = uri
    for _ in range(MAX_REDIRECTS + 1):
        connection, response = _request(url, fetch, rules)
        try:
            if response.status in _REDIRECTS and response.getheader("Location"):
                url = next_hop(url, response.getheader("Location"), rules)
                continue
            return _read_response(uri, response, fetch, deadline)
        except TimeoutError as exc:
            raise PhotoError("timeout", f"{uri}: no data for {fetch.timeout_s}s") from exc
        except http.client.IncompleteRead as exc:
            raise PhotoError("truncated", f"{uri}: {exc!r}") from exc
        except (http.client.HTTPException, OSError) as exc:
            raise PhotoError("connection", f"{uri}: {type(exc).__name__}: {exc}") from exc
        finally:
            connection.close()
    raise PhotoError("too_many_redirects", f"{uri}: more than {MAX_REDIRECTS} redirects")


def next_hop(url: str, location: str, rules: UriRules) -> str:
    """A redirect's target, checked against the allow-list (its address is checked when connecting);
    https never leads to http."""
    target = urljoin(url, location)
    if urlsplit(url).scheme == "https" and urlsplit(target).scheme != "https":
        raise refused(target)
    return check_uri(target, rules)


def _request(url: str, fetch: FetchConfig, rules: UriRules):
    """-> (connection, response) for a GET of a normalised http(s) URL, connected to the address that
    `resolve` checked: no second DNS lookup between the check and the connect."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    address = resolve(parts.hostname or "", port, rules)
    # Host header, TLS SNI and the certificate check use the host name; the socket, the checked address.
    cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
    connection = cls(parts.hostname, port, timeout=fetch.timeout_s)
    connection._create_connection = lambda _by_name, timeout, source: socket.create_connection(address, timeout, source)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("GET", target, headers={"User-Agent": f"depop-embed/{__version__}", "Accept": "image/*"})
        return connection, connection.getresponse()
    except TimeoutError as exc:
        connection.close()
        raise PhotoError("timeout", f"{url}: no answer within {fetch.timeout_s}s") from exc
    except (http.client.HTTPException, OSError) as exc:  # refused, reset, a malformed status line, ...
        connection.close()
        raise PhotoError("connection", f"{url}: {type(exc).__name__}: {exc}") from exc


def _read_response(uri: str, response: http.client.HTTPResponse, fetch: FetchConfig, deadline: float) -> bytes:
    if response.status >= 300:
        raise PhotoError(_status_code(response.status), f"HTTP {response.status} from {uri}")
    if "Content-Type" in response.headers:
        content_type = response.headers.get_content_type()
        if not (content_type.startswith("image/") or content_type in _IMAGE_CONTENT_TYPES):
            raise PhotoError("not_an_image", f"{uri} answered with Content-Type {content_type}")
    declared = response.headers.get("Content-Length")
    declared = int(declared) if declared and declared.isdigit() else None
    if declared is not None:
        _check_size(declared, fetch.max_bytes, uri)
    body = _read_capped(response, fetch.max_bytes, uri, deadline)
    if declared is not None and len(body) < declared:
        raise PhotoError("truncated", f"{uri}: got {len(body)} of {declared} bytes")
    return body


def _status_code(status: int) -> str:
    if status in (404, 410):
        return "not_found"
    if status == 429:
        return "rate_limited"
    if 500 <= status <= 599:
        return "http_5xx"
    return "http_4xx" if 400 <= status <= 499 else "http_error"


def _read_capped(stream, max_bytes: int, uri: str, deadline: float | None = None) -> bytes:
    """Read to the end, but stop (too_large) as soon as more than `max_bytes` arrived, or the deadline passed."""
    # read1 returns what one receive brings: a body that trickles in cannot block past the deadline.
    read = getattr(stream, "read1", stream.read)
    buf = bytearray()
    while chunk := read(_CHUNK):
        buf += chunk
        _check_size(len(buf), max_bytes, uri)
        if deadline is not None and time.monotonic() > deadline:
            raise PhotoError("timeout", f"{uri}: body not received within the timeout ({len(buf)} bytes so far)")
    return bytes(buf)


def _check_size(size: int, max_bytes: int, uri: str) -> None:
    if size > max_bytes:
        raise PhotoError("too_large", f"{uri}: more than images.fetch.max_bytes ({max_bytes}) bytes")


def _check_shape(image: Image.Image) -> None:
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        raise PhotoError("bad_aspect_ratio", f"{width}x{height} pixels is more than {MAX_ASPECT_RATIO}:1")


def _reduce(image: Image.Image, max_pixels: int, min_side: int) -> None:
    """Pick the JPEG draft scale (draft() can be set once): what the cap needs, else `min_side`.
    Any other format over the cap is refused."""
    width, height = image.size
    if image.format in ("JPEG", "MPO"):
        # draft() decodes at 1/2, 1/4 or 1/8 scale, the largest reduction that keeps both sides at or
        # above the requested size.
        if width * height > max_pixels:
            # The power-of-two reduction that brings the pixels under the cap.
            scale = 2 ** math.ceil(math.log2((width * height / max_pixels) ** 0.5))
            image.draft("RGB", (width // scale, height // scale))
        elif min_side:
            image.draft("RGB", (min_side, min_side))
    if image.size[0] * image.size[1] > max_pixels:
        raise PhotoError("too_large", f"{width}x{height} pixels is over encode.max_image_pixels ({max_pixels})")


def _apply_orientation(image: Image.Image) -> None:
    """Turn the image as the phone that took it shows it."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 - Pillow turns the pixels, then may fail to rewrite a malformed
        pass  # EXIF block (a tag of the wrong type): the photo is still good


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        image = _sixteen_bit_to_l(image)
    if "A" in image.getbands() or "transparency" in image.info:  # an alpha band, a transparent index or colour key
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit greyscale to 8 bits by scaling (x / 257); Pillow's own conversion clips at 255 (white)."""
    samples = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    return Image.fromarray(((samples * 255 + 32767) // 65535).astype(np.uint8), "L")
