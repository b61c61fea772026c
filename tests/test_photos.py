import io

import numpy as np
import pytest
from PIL import Image

import hostile_corpus as hostile
from depop_embed.config import FetchConfig
from depop_embed.photos import PhotoError, content_hash, decode, read_bytes
from depop_embed.uri_rules import UriRules, build_rules
from hostile_corpus import encoded

FETCH = FetchConfig()


def assert_same_pixels(actual: Image.Image, expected: Image.Image, tolerance: int = 0) -> None:
    assert actual.mode == "RGB" and actual.size == expected.size
    diff = np.abs(np.asarray(actual, dtype=np.int16) - np.asarray(expected.convert("RGB"), dtype=np.int16))
    assert diff.max() <= tolerance, f"pixels differ by up to {diff.max()}"


@pytest.mark.parametrize(
    "build",
    [hostile.grey16, hostile.one_bit, hostile.palette_with_transparency, hostile.rgba, hostile.grey_alpha,
     hostile.rgb_colour_key],
    ids=lambda f: f.__name__,
)
def test_modes_become_the_rgb_photo_they_show(build):
    data, expected = build()
    assert_same_pixels(decode(data, 10_000), expected)


def test_sixteen_bit_colour_becomes_eight_bit():
    data, expected = hostile.rgb16()
    assert_same_pixels(decode(data, 10_000), expected, tolerance=1)  # Pillow keeps the high byte: x // 256


def test_sixteen_bit_is_scaled_not_clipped():
    data, _ = hostile.grey16()
    rgb = np.asarray(decode(data, 10_000))
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert 120 <= rgb[8, 32, 0] <= 136  # mid-ramp is mid-grey, where Pillow's own conversion gives 255
    assert len(np.unique(rgb)) > 200  # the ramp keeps its steps


def test_cmyk_jpeg_keeps_its_colours():
    rgb = decode(hostile.cmyk_jpeg(), 10_000)
    red, green = np.asarray(rgb.getpixel((4, 16))), np.asarray(rgb.getpixel((28, 16)))
    assert np.abs(red - (255, 0, 0)).max() <= 12 and np.abs(green - (0, 255, 0)).max() <= 12


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_give_their_first_frame(fmt):
    data, first = hostile.animated(fmt)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert_same_pixels(decode(data, 10_000), first)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_turns_the_photo_upright(orientation):
    data, upright = hostile.with_orientation(orientation)
    assert_same_pixels(decode(data, 10_000), upright)


def test_a_malformed_exif_block_does_not_cost_the_photo():
    # Pillow turns the pixels, then fails to rewrite this EXIF: the photo is still usable and upright.
    assert decode(hostile.malformed_exif(), 10_000).size == (20, 40)


def test_a_huge_jpeg_is_decoded_under_the_cap_without_full_decode():
    rgb = decode(hostile.huge_jpeg(6000, 4000), 2_000_000)
    assert rgb.size == (1500, 1000)  # 1/4 scale: the largest draft scale under the cap


@pytest.mark.parametrize(
    "data",
    [hostile.png_bomb(), hostile.gif_bomb(), hostile.webp_bomb()],
    ids=["png", "gif", "webp"],
)
def test_bombs_are_refused_from_the_header(data):
    with pytest.raises(PhotoError, match=r"too_large: \d+x\d+ pixels is over encode.max_image_pixels \(2000000\)"):
        decode(data, 2_000_000)


def test_a_header_is_refused_before_any_pixel_data_is_read():
    # This PNG has no pixel data: decoding would fail as 'corrupt'; refusing on the header does not.
    data = hostile.header_only_png(9000, 9000)
    with pytest.raises(PhotoError, match="too_large: 9000x9000 pixels"):
        decode(data, 2_000_000)
    with pytest.raises(PhotoError) as info:
        decode(hostile.header_only_png(100, 100), 2_000_000)
    assert info.value.code == "corrupt"


def test_elongated_images_are_refused_from_the_header():
    # Under any pixel cap, but open_clip would scale the short side up to the model's size first.
    with pytest.raises(PhotoError, match="bad_aspect_ratio: 20000x1 pixels is more than 20:1"):
        decode(hostile.png(20000, 1, 8, 2, [bytes(60000)]), 50_000_000)
    with pytest.raises(PhotoError, match="bad_aspect_ratio"):
        decode(encoded(Image.new("RGB", (3, 61)), "PNG"), 10_000)
    assert decode(encoded(Image.new("RGB", (3, 60)), "PNG"), 10_000).size == (3, 60)  # 20:1 is a panorama


def test_pillows_own_bomb_guard_is_a_reason_code_too():
    # Above twice Image.MAX_IMAGE_PIXELS Pillow refuses in open(), even under a larger configured cap.
    with pytest.raises(PhotoError) as info:
        decode(hostile.header_only_png(20000, 20000), 10**9)
    assert info.value.code == "too_large" and "decompression bomb" in str(info.value)


@pytest.mark.parametrize(
    "data, code",
    [
        (hostile.HEIC_LIKE, "unsupported_format"),
        (hostile.EPS, "unsupported_format"),  # Pillow could open it (with Ghostscript); a photo it is not
        (hostile.HTML_PAGE, "unsupported_format"),
        (hostile.encoded(hostile.quadrants(), "PNG")[:-40], "corrupt"),
    ],
    ids=["heic", "eps", "html", "truncated_png"],
)
def test_unreadable_formats_have_reason_codes(data, code):
    with pytest.raises(PhotoError) as info:
        decode(data, 10_000)
    assert info.value.code == code


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


def in_folder(folder) -> UriRules:
    return build_rules((str(folder),), allow_private_networks=False)


def test_read_bytes_from_paths_and_file_uris(tmp_path):
    path = tmp_path / "a b.jpg"
    path.write_bytes(b"xyz")
    assert read_bytes(str(path), FETCH, in_folder(tmp_path)) == b"xyz"
    assert read_bytes(path.as_uri(), FETCH, in_folder(tmp_path)) == b"xyz"  # file:///.../a%20b.jpg
    assert content_hash(b"xyz") == content_hash(read_bytes(str(path), FETCH, in_folder(tmp_path)))


def test_read_bytes_failures_have_reason_codes(tmp_path):
    with pytest.raises(PhotoError, match="missing"):
        read_bytes(str(tmp_path / "nope.jpg"), FETCH, in_folder(tmp_path))
    with pytest.raises(PhotoError, match="missing"):
        read_bytes(None, FETCH, in_folder(tmp_path))
    with pytest.raises(PhotoError, match="unsupported_uri"):  # allowed, but no fsspec backend knows it
        read_bytes("nosuchscheme://bucket/key.jpg", FETCH, build_rules(("nosuchscheme://bucket/",), False))


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


def test_a_file_over_the_byte_cap_is_refused(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(b"\xff" * 5000)
    assert read_bytes(str(path), FetchConfig(max_bytes=5000), in_folder(tmp_path)) == b"\xff" * 5000
    with pytest.raises(PhotoError, match="too_large: .*images.fetch.max_bytes \\(4999\\)"):
        read_bytes(str(path), FetchConfig(max_bytes=4999), in_folder(tmp_path))
    with pytest.raises(PhotoError, match="too_large"):  # no size to check up front: the read stops at the cap
        read_bytes("/dev/zero", FetchConfig(max_bytes=1_000_000), in_folder("/dev"))
