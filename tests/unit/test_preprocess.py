"""Decoding and preprocessing: the served pixels equal open_clip's own transform for every format and mode."""

import asyncio
import io
import struct
import threading
import tracemalloc
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
from serve_app.imaging import decode_base64, decode_image, draft_scale
from serve_app.modeling import load_model_config
from serve_app.preprocess import DEFAULT_DECODE_THREADS, ModelPreprocessing, Preprocessor, decode_threads
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


# ------------------------------------------------------------------ image_decode: fast

# Measured (tests below, ViT-g/14's 224 px and the tiny model's 48 px, quality 90, all 8 orientations): mean
# |fast - exact| 0.0015-0.005 and max 0.02-0.10 in normalised units. The bound leaves about 3x and 2x margin.
FAST_MEAN_BOUND = 0.015
FAST_MAX_BOUND = 0.2

# exif_transpose undoes these: a JPEG stored this way with orientation o shows the scene upright.
STORED_AS = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
             7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def oriented_photo(width: int, height: int, orientation: int, seed: int) -> bytes:
    """A photo-like JPEG (smooth fields, shapes, mild noise: not random noise) showing a width x height scene,
    stored turned so that its EXIF orientation turns it back."""
    from serve_app.bench.payloads import synthetic_jpeg

    scene = Image.open(io.BytesIO(synthetic_jpeg(width, height, seed=seed, quality=95)))
    stored = scene if STORED_AS[orientation] is None else scene.transpose(STORED_AS[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=90, exif=exif.tobytes())


def fast_and_exact(spec: ModelSpec, limits: ImageLimits = LIMITS) -> tuple[ModelPreprocessing, ModelPreprocessing]:
    return (ModelPreprocessing(spec.model_copy(update={"image_decode": "fast"}), limits),
            ModelPreprocessing(spec, limits))


def difference(pre: ModelPreprocessing, fast: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    std = np.asarray(pre.pipeline.std, dtype=np.float32).reshape(3, 1, 1)
    diff = np.abs(fast.astype(np.float32) - exact.astype(np.float32)) / 255 / std
    return float(diff.mean()), float(diff.max())


@pytest.mark.parametrize(
    "width, height, min_side, scale",
    [(4000, 3000, 448, 4), (4032, 3024, 448, 4), (3000, 4000, 448, 4), (1920, 1080, 448, 2), (640, 480, 448, 1),
     (8000, 6000, 448, 8), (896, 1600, 96, 8), (900, 1600, 96, 4), (1000, 750, 96, 2), (1001, 757, 96, 1),
     (100, 90, 96, 1)],
)
def test_draft_scale_keeps_both_sides_at_least_the_minimum_and_divides_them(width, height, min_side, scale):
    assert draft_scale(width, height, min_side) == scale
    assert width % scale == 0 and height % scale == 0
    assert scale == 1 or min(width, height) // scale >= min_side


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("width, height", [(400, 300), (904, 1600), (900, 1600), (1001, 757)])
def test_fast_decode_stays_close_to_exact_in_every_orientation(tiny_model_dir: Path, width, height, orientation):
    fast, exact = fast_and_exact(ModelSpec(model=f"local-dir:{tiny_model_dir}"))
    assert fast.draft_size == 96  # twice the tiny model's 48 px
    uri = data_uri(oriented_photo(width, height, orientation, seed=width + orientation))
    shown = exact.decode(uri, "input[0]").size
    assert shown == (width, height)  # orientation applied (exact path, open_clip's own reference above)
    scale = draft_scale(width, height, 96)
    assert fast.decode(uri, "input[0]").size == (width // scale, height // scale)  # reduced, turned the same way
    mean, worst = difference(exact, fast.pixels(uri, "input[0]"), exact.pixels(uri, "input[0]"))
    assert mean <= FAST_MEAN_BOUND and worst <= FAST_MAX_BOUND, (mean, worst)


@pytest.mark.parametrize("orientation", [1, 6])
def test_fast_decode_of_a_12_megapixel_photo_decodes_a_quarter_of_each_side(orientation):
    spec = ModelSpec(model="ViT-g-14")  # a built-in config: preprocessing needs no weights
    fast, exact = fast_and_exact(spec, ImageLimits(max_image_pixels=50_000_000, max_image_bytes=20_000_000))
    assert fast.draft_size == 448
    uri = data_uri(oriented_photo(4000, 3000, orientation, seed=7))
    assert exact.decode(uri, "input[0]").size == (4000, 3000)
    assert fast.decode(uri, "input[0]").size == (1000, 750)
    mean, worst = difference(exact, fast.pixels(uri, "input[0]"), exact.pixels(uri, "input[0]"))
    assert mean <= FAST_MEAN_BOUND and worst <= FAST_MAX_BOUND, (mean, worst)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_decode_leaves_other_formats_and_small_jpegs_as_they_are(tiny, tiny_model_dir: Path, case):
    exact, _ = tiny
    fast = ModelPreprocessing(ModelSpec(model=f"local-dir:{tiny_model_dir}", image_decode="fast"), LIMITS)
    uri = data_uri(CASES[case]())
    assert torch.equal(fast.images([uri], ["input[0]"]), exact.images([uri], ["input[0]"]))


# ------------------------------------------------------------------ base64 without copies


@pytest.mark.parametrize("as_data_uri", [False, True])
def test_base64_is_decoded_without_copying_the_payload(as_data_uri):
    raw = np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()
    text = data_uri(raw) if as_data_uri else b64(raw)
    limits = ImageLimits(max_image_bytes=10_000_000)
    tracemalloc.start()
    try:
        assert decode_base64(text, "input[0]", limits) == raw
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the decoded bytes, plus one copy of the text to cut off a data: URI's prefix; nothing more
    assert peak < len(raw) + (len(text) if as_data_uri else 0) + 100_000


# ------------------------------------------------------------------ the Preprocessor deployment's threads


def test_decode_threads_follow_the_replicas_cpus():
    assert [decode_threads(c) for c in (0.25, 0.5, 1, 1.5, 4)] == [1, 1, 1, 2, 4]
    assert decode_threads(None) == DEFAULT_DECODE_THREADS


def preprocessor(tiny_model_dir: Path, num_cpus: float | None):
    spec = ModelSpec(model=f"local-dir:{tiny_model_dir}", served_model_name="tiny")
    threads = torch.get_num_threads()
    try:
        return Preprocessor.func_or_class([spec], LIMITS, num_cpus=num_cpus)
    finally:
        torch.set_num_threads(threads)  # the replica's torch.set_num_threads(1) is for its own process


def test_one_requests_images_decode_in_parallel_in_input_order(tiny_model_dir: Path, monkeypatch):
    deployment = preprocessor(tiny_model_dir, num_cpus=2)
    assert deployment.threads == 2
    uris = [data_uri(encode(random_image(seed=s), "JPEG", quality=90)) for s in range(4)]
    expected = deployment._models["tiny"].images(uris, [f"input[{i}]" for i in range(4)])
    both_at_once = threading.Barrier(2, timeout=10)  # passes only when two images decode at the same time
    threads: set[str] = set()
    original = ModelPreprocessing.pixels_of

    def pixels_of(self, image, param):
        threads.add(threading.current_thread().name)
        if param in ("input[0]", "input[1]"):
            both_at_once.wait()
        return original(self, image, param)

    monkeypatch.setattr(ModelPreprocessing, "pixels_of", pixels_of)
    result = asyncio.run(deployment.images("tiny", uris, [f"input[{i}]" for i in range(4)]))
    assert torch.equal(result, expected)
    assert len(threads) == 2 and all(name.startswith("decode") for name in threads)


def test_a_requests_first_bad_image_by_position_is_reported(tiny_model_dir: Path):
    deployment = preprocessor(tiny_model_dir, num_cpus=2)
    good = data_uri(encode(random_image(seed=1), "JPEG"))
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(deployment.images("tiny", [good, "not base64!", b64(b"no image")],
                                      ["input[0]", "input[1]", "input[2]"]))
    assert info.value.param == "input[1]"
