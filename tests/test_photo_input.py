"""The photo path split between host and device (`Encoder.load_photo` -> `Encoder.photo_input`) against
open_clip's own transform on the full Pillow decode: vectors keep cosine >= 0.9999 over the sample
photos and odd sizes and modes, with JPEG draft decoding on and off and with JPEGs decoded by
torchvision (the CPU variant of the device decoder)."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import hostile_corpus as hostile
from conftest import SAMPLE, TINY_MODEL
from depop_embed import encoders, photos
from depop_embed.config import ModelConfig
from depop_embed.encoders import PhotoTransform
from hostile_corpus import encoded

CAP = 50_000_000
PARITY = 0.9999
# (draft, device_jpeg): the job's default, no draft, and the device JPEG decoder (on the CPU here).
PATHS = {"draft": (True, False), "full": (False, False), "device_jpeg": (True, True)}


@pytest.fixture(scope="module")
def encoder():
    return encoders.build_encoder(ModelConfig(name="depop-tiny-clip", config_path=TINY_MODEL, seed=0), "cpu")


def textured(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A photo-like image: a sample photo stretched to the size, plus a little noise (fine detail that a
    careless reduction would alias)."""
    base = Image.open(SAMPLE / "photos" / "L000001_1.jpg").convert("RGB").resize((width, height), Image.BICUBIC)
    noise = np.random.default_rng(seed).integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(base, dtype=np.int16) + noise, 0, 255).astype(np.uint8)).convert(mode)


def sixteen_bit_png(width: int, height: int) -> bytes:
    grey = np.asarray(textured(width, height, "L"), dtype=np.uint16) * 257
    return hostile.png(width, height, 16, 0, [row.astype(">u2").tobytes() for row in grey])


def oriented_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(textured(300, 200), "JPEG", quality=92, exif=exif)


def transparent(mode: str) -> bytes:
    image = textured(160, 120, "RGBA")
    alpha = Image.linear_gradient("L").resize(image.size)
    image.putalpha(alpha)
    if mode == "P":
        return encoded(image.convert("RGB").quantize(64), "PNG", transparency=3)
    return encoded(image.convert(mode), "PNG")


ODD_PHOTOS = {
    "tiny_1x1": encoded(Image.new("RGB", (1, 1), (200, 30, 90)), "PNG"),
    "tiny_3x5_jpeg": encoded(textured(3, 5), "JPEG"),
    "wide_20_to_1": encoded(textured(1200, 60), "JPEG", quality=90),
    "tall_1_to_20": encoded(textured(40, 800), "PNG"),
    "huge_jpeg_draft_1_8": encoded(textured(3000, 4000), "JPEG", quality=90),
    "phone_jpeg": encoded(textured(1080, 1350), "JPEG", quality=88),
    "progressive_jpeg": encoded(textured(800, 1000), "JPEG", quality=85, progressive=True),
    "grey_jpeg": encoded(textured(500, 400, "L"), "JPEG"),
    "grey_png": encoded(textured(300, 200, "L"), "PNG"),
    "grey_alpha": transparent("LA"),
    "palette_transparency": transparent("P"),
    "rgba": transparent("RGBA"),
    "cmyk_jpeg": encoded(textured(400, 300, "CMYK"), "JPEG", quality=92),
    "grey16_png": sixteen_bit_png(320, 240),
    "rgb16_png": hostile.rgb16()[0],
    "one_bit": hostile.one_bit()[0],
    "webp": encoded(textured(400, 500), "WEBP", quality=90),
    **{f"exif_orientation_{o}": oriented_jpeg(o) for o in range(2, 9)},
}


def reference_vectors(encoder, datas: list[bytes]) -> np.ndarray:
    """open_clip's own transform on the photo as the job decodes it, in full (no draft scale)."""
    return encoder.encode_images(torch.stack([encoder.preprocess(photos.decode(d, CAP)) for d in datas]))


def path_vectors(encoder, datas: list[bytes], path: str) -> np.ndarray:
    draft, device_jpeg = PATHS[path]
    return encoder.encode_images(encoder.photo_input([encoder.load_photo(d, CAP, draft, device_jpeg) for d in datas]))


@pytest.mark.parametrize("path", PATHS)
def test_sample_photos_keep_parity_with_open_clips_transform(encoder, path):
    datas = [p.read_bytes() for p in sorted((SAMPLE / "photos").iterdir())]
    cosines = (path_vectors(encoder, datas, path) * reference_vectors(encoder, datas)).sum(axis=1)
    assert len(datas) == 497 and cosines.min() >= PARITY, f"worst photo: cosine {cosines.min():.6f}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ODD_PHOTOS)
def test_odd_sizes_and_modes_keep_parity(encoder, name, path):
    data = ODD_PHOTOS[name]
    cosine = float((path_vectors(encoder, [data], path) * reference_vectors(encoder, [data])).sum())
    assert cosine >= PARITY


def test_a_batch_of_mixed_sizes_comes_back_in_input_order(encoder):
    datas = [ODD_PHOTOS[n] for n in ("phone_jpeg", "grey_png", "tiny_1x1", "rgba", "cmyk_jpeg")] * 2
    loaded = [encoder.load_photo(d, CAP, True, device_jpeg=i % 2 == 0) for i, d in enumerate(datas)]
    batch = encoder.encode_images(encoder.photo_input(loaded))
    one_by_one = np.concatenate([encoder.encode_images(encoder.photo_input([item])) for item in loaded])
    np.testing.assert_allclose(batch, one_by_one, atol=1e-6)
    # The same photos, decoded in full on the device or at draft scale on the host, and the other way round.
    assert (batch[:5] * batch[5:]).sum(axis=1).min() >= PARITY


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_decoded_jpegs_are_turned_as_pillow_turns_them(encoder, orientation):
    data = oriented_jpeg(orientation)
    jpeg = photos.jpeg_for_device(data, CAP)
    assert jpeg is not None and jpeg.orientation == orientation
    (device,) = encoder._decode_jpegs([jpeg])
    host = photos.decode_pixels(data, CAP)
    assert tuple(device.shape) == host.shape
    # libjpeg-turbo in torchvision and in Pillow: the same decoder, up to chroma upsampling.
    assert np.abs(device.numpy().astype(int) - host).mean() < 1.0


@pytest.mark.parametrize(
    "data, expected",
    [
        (encoded(textured(64, 48), "JPEG"), "device"),
        (encoded(textured(64, 48, "L"), "JPEG"), "device"),
        (ODD_PHOTOS["cmyk_jpeg"], "host"),  # Pillow's CMYK conversion is the one the vectors follow
        (encoded(textured(64, 48), "PNG"), "host"),
        (encoded(textured(64, 48), "JPEG")[:-300], "host"),  # cut short: Pillow says it is corrupt
        (encoded(textured(400, 300), "JPEG"), "host"),  # over the cap below: decoded at draft scale
        (hostile.EPS, "host"),
    ],
    ids=["rgb", "grey", "cmyk", "png", "truncated", "over_cap", "eps"],
)
def test_only_plain_jpegs_under_the_cap_go_to_the_device(data, expected):
    assert (photos.jpeg_for_device(data, max_pixels=100_000) is not None) == (expected == "device")


def test_the_device_path_refuses_what_the_host_path_refuses(encoder):
    with pytest.raises(photos.PhotoError, match="bad_aspect_ratio"):
        photos.jpeg_for_device(encoded(textured(630, 30), "JPEG"), CAP)
    with pytest.raises(photos.PhotoError) as info:
        encoder.load_photo(encoded(textured(64, 48), "JPEG")[:-300], CAP, device_jpeg=True)
    assert info.value.code == "corrupt"


def test_a_jpeg_the_device_decoder_refuses_is_decoded_on_the_host(encoder):
    good = encoded(textured(200, 160), "JPEG")
    jpeg = photos.jpeg_for_device(good, CAP, encoder.image_side)
    # Bytes torchvision cannot decode (a PNG) but Pillow can: the fallback, not the decoder, gives the pixels.
    refused = photos.DeviceJpeg(encoded(textured(200, 160), "PNG"), 200, 160, 1, CAP, encoder.image_side)
    out = encoder._decode_jpegs([jpeg, refused, jpeg])
    assert isinstance(out[0], torch.Tensor) and isinstance(out[1], np.ndarray) and out[1].shape == (160, 200, 3)
    assert torch.equal(out[0], out[2])
    # A JPEG header with garbage for pixel data: both decoders refuse it, and Pillow says why.
    broken_bytes = good[:600] + bytes(range(256)) * 8 + b"\xff\xd9"
    broken = photos.DeviceJpeg(broken_bytes, 200, 160, 1, CAP, encoder.image_side)
    with pytest.raises(photos.PhotoError) as info:
        encoder.photo_input([broken])
    assert info.value.code == "corrupt"


@pytest.mark.parametrize(
    "cfg",
    [
        dict(size=48, resize_mode="shortest"),
        dict(size=(40, 56), resize_mode="shortest"),
        dict(size=48, resize_mode="longest", fill_color=128),
        dict(size=(40, 56), resize_mode="squash", interpolation="bilinear"),
    ],
    ids=["shortest_square", "shortest_oblong", "longest_padded", "squash_bilinear"],
)
@pytest.mark.parametrize("size", [(300, 200), (200, 300), (30, 20), (48, 48)], ids=str)
def test_every_open_clip_resize_mode_gives_open_clips_pixels(cfg, size):
    settings = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "interpolation": "bicubic", **cfg}
    reference = open_clip.image_transform(
        settings["size"], is_train=False, mean=settings["mean"], std=settings["std"],
        resize_mode=settings["resize_mode"], interpolation=settings["interpolation"],
        fill_color=settings.get("fill_color", 0),
    )
    image = textured(*size)
    expected = reference(image)
    ours = PhotoTransform.of(settings)(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None])[0]
    assert ours.shape == expected.shape
    # One step of 8-bit rounding apart at most (Pillow and torch round the resize's output independently).
    step = 1 / (255 * min(settings["std"]))
    assert (ours - expected).abs().max() <= 1.01 * step
    assert (ours - expected).abs().mean() <= 0.25 * step  # most pixels equal
