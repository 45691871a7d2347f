"""Decoding and preprocessing: the served pixels equal open_clip's own transform for every format and mode."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image, ImageOps

from serve_app.config import ImageLimits, ModelSpec
from serve_app.dev_model import TINY_MODEL_CFG, write_tiny_model
from serve_app.errors import InvalidRequest, PayloadTooLarge
from serve_app.imaging import decode_image
from serve_app.modeling import load_model_config
from serve_app.preprocess import ModelPreprocessing
from tests.conftest import b64, data_uri, encode, random_image

LIMITS = ImageLimits(max_image_pixels=4_000_000, max_image_bytes=2_000_000)


def normalised(pre: ModelPreprocessing, pixels: torch.Tensor) -> torch.Tensor:
    """What the encoder does on its device: open_clip's ToTensor + Normalize on uint8 pixels."""
    mean = torch.tensor(pre.pipeline.mean).view(-1, 1, 1)
    std = torch.tensor(pre.pipeline.std).view(-1, 1, 1)
    return (pixels.float().div(255) - mean) / std


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    spec = ModelSpec(model=f"local-dir:{tiny_model_dir}")
    _, _, preprocess = open_clip.create_model_and_transforms(spec.model)
    return ModelPreprocessing(spec, LIMITS), preprocess


def exif_rotated_jpeg() -> bytes:
    image = random_image(80, 50, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise when shown
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def animated_gif() -> bytes:
    frames = [random_image(60, 40, seed=s).convert("P") for s in (4, 5)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


CASES = {
    "jpeg-rgb": lambda: encode(random_image(seed=1), "JPEG", quality=90),
    "jpeg-cmyk": lambda: encode(random_image(seed=2, mode="CMYK"), "JPEG"),
    "jpeg-grayscale": lambda: encode(random_image(seed=2, mode="L"), "JPEG"),
    "jpeg-exif-rotated": exif_rotated_jpeg,
    "png-rgb": lambda: encode(random_image(seed=6)),
    "png-rgba": lambda: encode(random_image(seed=7, mode="RGBA")),
    "png-palette": lambda: encode(random_image(seed=8, mode="P")),
    "png-grayscale": lambda: encode(random_image(seed=9, mode="L")),
    "png-grayscale-alpha": lambda: encode(random_image(seed=9, mode="LA")),
    "png-bilevel": lambda: encode(random_image(seed=10, mode="1")),
    "png-16bit-grayscale": lambda: encode(Image.fromarray(
        np.random.RandomState(15).randint(0, 65536, (50, 70), dtype=np.uint16).astype(np.int32)).convert("I;16")),
    "jpeg-mpo-phone": lambda: encode(random_image(seed=16), "MPO", save_all=True, append_images=[random_image(seed=17)]),
    "gif-animated": animated_gif,
    "webp": lambda: encode(random_image(seed=11), "WEBP", lossless=True),
    "bmp": lambda: encode(random_image(seed=12), "BMP"),
    "tiny-1x1": lambda: encode(random_image(1, 1, seed=13)),
    "tall": lambda: encode(random_image(20, 300, seed=14)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pixels_match_open_clip_preprocess_of_exif_transposed_image(tiny, case):
    pre, preprocess = tiny
    raw = CASES[case]()
    reference = preprocess(ImageOps.exif_transpose(Image.open(io.BytesIO(raw))))
    pixels = pre.images([data_uri(raw)], ["input[0]"])
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 3, 48, 48)
    assert torch.allclose(normalised(pre, pixels[0]), reference, atol=1e-6)


def test_exif_orientation_is_applied(tiny):
    pre, _ = tiny
    image = decode_image(b64(exif_rotated_jpeg()), "input[0]", LIMITS)
    assert image.size == (50, 80)  # stored 80x50, shown rotated


@pytest.mark.parametrize(
    "resize_mode, image_size",
    [("squash", 40), ("longest", 40), ("shortest", [32, 48])],
)
def test_other_resize_modes_and_sizes_match_open_clip(tmp_path: Path, resize_mode, image_size):
    model_cfg = {**TINY_MODEL_CFG, "vision_cfg": {**TINY_MODEL_CFG["vision_cfg"], "image_size": image_size}}
    preprocess_cfg = {"mean": [0.1, 0.2, 0.3], "std": [0.3, 0.2, 0.1], "interpolation": "bicubic",
                      "resize_mode": resize_mode, "fill_color": 17}
    directory = write_tiny_model(tmp_path / resize_mode, model_cfg=model_cfg, preprocess_cfg=preprocess_cfg)
    spec = ModelSpec(model=f"local-dir:{directory}")
    model, _, preprocess = open_clip.create_model_and_transforms(spec.model)
    config = load_model_config(spec.model)
    assert config.preprocess_cfg == open_clip.get_model_preprocess_cfg(model)
    pre = ModelPreprocessing(spec, LIMITS)
    for seed, (w, h) in enumerate([(100, 30), (30, 100), (64, 64)]):
        raw = encode(random_image(w, h, seed=seed))
        reference = preprocess(Image.open(io.BytesIO(raw)))
        pixels = pre.images([b64(raw)], ["input[0]"])[0]
        assert torch.allclose(normalised(pre, pixels), reference, atol=1e-6), (w, h)


def test_builtin_model_config_without_weights():
    config = load_model_config("ViT-B-32", "random")
    assert config.image_size == (224, 224) and config.embed_dim == 512
    assert config.preprocess_cfg["mean"] == open_clip.OPENAI_DATASET_MEAN


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries one tiny IDAT: a decompression bomb's header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_rejected_before_decoding():
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(b64(png_header_only(20000, 20000)), "input[4]", LIMITS)
    assert info.value.param == "input[4]" and "400000000 pixels" in info.value.message
    # Under Pillow's own (higher) guard, our check still stops it from the header alone.
    Image.MAX_IMAGE_PIXELS, saved = None, Image.MAX_IMAGE_PIXELS
    try:
        with pytest.raises(PayloadTooLarge) as info:
            decode_image(b64(png_header_only(3000, 2000)), "input[0]", LIMITS)
        assert "3000x2000 = 6000000 pixels" in info.value.message
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@pytest.mark.parametrize(
    "data, expected_error, words",
    [
        ("not base64 at all!", InvalidRequest, "base64"),
        (b64(b"hello, I am not an image"), InvalidRequest, "not an image"),
        (b64(encode(random_image(seed=1), "JPEG")[:300]), InvalidRequest, "truncated"),
        (b64(encode(random_image(seed=1))[:-40]), InvalidRequest, "truncated"),
        ("data:image/png,rawbytes", InvalidRequest, "base64"),
        ("", InvalidRequest, "empty"),
        ("A" * 3_000_000, PayloadTooLarge, "byte limit"),
        (b64(encode(random_image(seed=1), "TIFF")), InvalidRequest, "supported format"),
    ],
)
def test_bad_images_raise_client_errors(data, expected_error, words):
    with pytest.raises(expected_error) as info:
        decode_image(data, "input[1]", LIMITS)
    assert words in info.value.message
    assert info.value.param == "input[1]"


def test_base64_variants_are_accepted():
    raw = encode(random_image(seed=5))
    text = b64(raw)
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    urlsafe = text.replace("+", "-").replace("/", "_")
    for value in (text, wrapped, urlsafe, data_uri(raw), data_uri(raw).replace("data:image/png", "DATA:image/png")):
        assert decode_image(value, "input[0]", LIMITS).size == (120, 90)


def test_tokens_truncate_at_the_context_length_and_count_real_tokens(tiny):
    pre, _ = tiny
    batch = pre.texts(["a cat", "word " * 200])
    assert batch.tokens.shape == (2, 77)
    assert batch.token_counts == [4, 77]
    reference = open_clip.get_tokenizer("ViT-B-32")(["a cat", "word " * 200])
    assert torch.equal(batch.tokens, reference)
    assert np.all(batch.tokens[1].numpy()[-1] == reference[1].numpy()[-1])
