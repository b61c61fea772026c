import io

import pytest
from PIL import Image

from depop_embed.photos import PhotoError, content_hash, decode, read_bytes


def encoded(image: Image.Image, fmt: str, **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save_args)
    return buf.getvalue()


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent red
    image.paste((0, 0, 255, 255), (2, 0, 4, 2))  # opaque blue right half
    rgb = decode(encoded(image, "PNG"), 10_000)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((3, 1)) == (0, 0, 255)


def test_palette_with_transparent_index_is_composited_on_white():
    image = Image.new("P", (2, 1))
    image.putpalette([10, 200, 30] + [0, 0, 0] * 255)
    image.putpixel((1, 0), 1)
    rgb = decode(encoded(image, "PNG", transparency=1), 10_000)
    assert rgb.getpixel((0, 0)) == (10, 200, 30) and rgb.getpixel((1, 0)) == (255, 255, 255)


def test_greyscale_becomes_rgb():
    rgb = decode(encoded(Image.new("L", (3, 3), 77), "JPEG", quality=100), 10_000)
    assert rgb.mode == "RGB" and rgb.getpixel((1, 1)) == (77, 77, 77)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rgb = decode(encoded(image, "JPEG", exif=exif), 10_000)
    assert rgb.size == (20, 40)


def test_large_jpeg_is_decoded_at_reduced_scale_under_the_cap():
    data = encoded(Image.new("RGB", (4000, 3000), (1, 2, 3)), "JPEG")
    rgb = decode(data, 1_000_000)
    assert rgb.size[0] * rgb.size[1] <= 1_000_000 and rgb.size[0] >= 500


def test_large_png_over_the_cap_is_refused():
    data = encoded(Image.new("RGB", (2000, 2000)), "PNG")
    with pytest.raises(PhotoError, match="too_large") as info:
        decode(data, 1_000_000)
    assert info.value.code == "too_large"


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", "empty"),
        (b"<html>not found</html>", "unsupported_format"),
        (encoded(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:200], "corrupt"),
    ],
)
def test_unusable_bytes_raise_a_reason_code(data, code):
    with pytest.raises(PhotoError) as info:
        decode(data, 10_000)
    assert info.value.code == code


def test_read_bytes_from_paths_and_file_uris(tmp_path):
    path = tmp_path / "a b.jpg"
    path.write_bytes(b"xyz")
    assert read_bytes(str(path)) == b"xyz"
    assert read_bytes(path.as_uri()) == b"xyz"  # file:///.../a%20b.jpg
    assert content_hash(b"xyz") == content_hash(read_bytes(str(path)))


def test_read_bytes_failures_have_reason_codes(tmp_path):
    with pytest.raises(PhotoError, match="missing"):
        read_bytes(str(tmp_path / "nope.jpg"))
    with pytest.raises(PhotoError, match="unsupported_uri"):
        read_bytes("nosuchscheme://bucket/key.jpg")


@pytest.mark.parametrize(
    "size, input_side, decoded",
    [
        ((800, 1000), 224, (400, 500)),  # 1/2 keeps 400 >= 1.4 * 224; 1/4 (200) would not
        ((1080, 1350), 224, (540, 675)),  # 1/4 (270) is under 1.4 * 224
        ((480, 600), 224, (480, 600)),  # too close to the input size for any reduction
        ((800, 1000), 64, (100, 125)),  # a small model input: the full 1/8
        ((800, 1000), 0, (800, 1000)),  # no input side: full decode
    ],
)
def test_jpegs_are_draft_decoded_no_smaller_than_the_margin_over_the_input(size, input_side, decoded):
    rgb = decode(encoded(Image.new("RGB", size, (90, 120, 30)), "JPEG"), 50_000_000, input_side)
    assert rgb.size == decoded
    assert min(rgb.size) >= 1.4 * input_side
    assert rgb.getpixel((decoded[0] // 2, decoded[1] // 2)) == pytest.approx((90, 120, 30), abs=3)


def test_pngs_are_never_reduced():
    assert decode(encoded(Image.new("RGB", (800, 1000)), "PNG"), 50_000_000, 64).size == (800, 1000)


def test_the_pixel_cap_wins_over_the_input_side():
    data = encoded(Image.new("RGB", (4000, 3000), (1, 2, 3)), "JPEG")
    rgb = decode(data, 1_000_000, input_side=1000)
    assert rgb.size[0] * rgb.size[1] <= 1_000_000
