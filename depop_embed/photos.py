"""Reading and decoding listing photos: untrusted user uploads.

A photo that cannot be read or decoded raises `PhotoError` with a short reason code, which the encoder
turns into an error row; it never takes the batch down. Decoded size is capped before pixels are
decoded (decompression bombs): JPEGs above the cap are decoded at a reduced scale (draft mode), other
formats are refused.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from urllib.parse import unquote, urlparse

from PIL import Image, ImageOps


class PhotoError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


def local_path(uri: str) -> str | None:
    """The filesystem path of a plain path or file: URI; None for other schemes."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a Windows drive letter is a path
        return uri
    return None


def read_bytes(uri: str) -> bytes:
    path = local_path(uri)
    try:
        if path is not None:
            with open(path, "rb") as fh:
                return fh.read()
        import fsspec  # object stores (s3://, gs://, abfss://...) through whatever fsspec backend is installed

        with fsspec.open(uri, "rb") as fh:
            return fh.read()
    except FileNotFoundError as exc:
        raise PhotoError("missing", f"no file at {uri}") from exc
    except (ImportError, ValueError) as exc:
        raise PhotoError("unsupported_uri", f"{uri}: {exc}") from exc
    except OSError as exc:
        raise PhotoError("read_failed", f"{uri}: {exc}") from exc


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> an RGB image as a phone shows it (EXIF orientation applied, transparency on white)."""
    if not data:
        raise PhotoError("empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _limit_pixels(image, max_pixels)
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except PhotoError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PhotoError("too_large", str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise PhotoError("unsupported_format", "not an image Pillow can read") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # Pillow's errors for corrupt files
        raise PhotoError("corrupt", f"{type(exc).__name__}: {exc}") from exc


def _limit_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height <= max_pixels:
        return
    if image.format == "JPEG":
        # draft() decodes at 1/2, 1/4 or 1/8 scale, the smallest reduction that stays at or above the
        # requested size; ask for the power-of-two reduction that brings the pixels under the cap.
        scale = 2 ** math.ceil(math.log2((width * height / max_pixels) ** 0.5))
        image.draft("RGB", (width // scale, height // scale))
        if image.size[0] * image.size[1] <= max_pixels:
            return
    raise PhotoError("too_large", f"{width}x{height} pixels is over the cap of {max_pixels}")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
