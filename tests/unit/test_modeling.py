"""Model loading (local-dir, emulated hub cache, built-in name) and the encoder's numerics against open_clip."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from serve_app.config import ModelSpec
from serve_app.encoder import EncoderCore
from serve_app.modeling import can_trim_text, encode_text, load_model

CAPTIONS = ["a", "a photo of a cat", "an extremely long caption " * 30, "x y z", "😀 emoji and ünïcödé"]


def test_trimmed_text_encoding_equals_open_clip(reference):
    model, _, tokenizer = reference
    tokens = tokenizer(CAPTIONS)
    assert can_trim_text(model)
    with torch.no_grad():
        expected = model.encode_text(tokens, normalize=True)
        got = encode_text(model, tokens)
        # Each caption alone (shortest possible trim) must agree with the batch too.
        alone = torch.cat([encode_text(model, tokens[i : i + 1]) for i in range(len(CAPTIONS))])
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(alone, expected, atol=1e-6)


def test_trimming_is_not_used_where_it_would_change_results(reference):
    model, _, tokenizer = reference
    model.text_pool_type = "last"  # pooling at the final position: padding matters
    try:
        assert not can_trim_text(model)
        tokens = tokenizer(["short"])
        with torch.no_grad():
            assert torch.allclose(encode_text(model, tokens), model.encode_text(tokens, normalize=True))
    finally:
        model.text_pool_type = "argmax"


def test_encoder_core_matches_open_clip_for_images_and_texts(tiny_model_dir, reference):
    model, preprocess, tokenizer = reference
    core = EncoderCore(ModelSpec(model=f"local-dir:{tiny_model_dir}", torch_threads=1))
    assert core.device == "cpu" and core.precision == "fp32" and core.image_size == (48, 48)
    pixels = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    from torchvision.transforms.functional import to_pil_image

    images = torch.stack([preprocess(to_pil_image(p)) for p in pixels])
    with torch.no_grad():
        expected_images = model.encode_image(images, normalize=True).numpy()
        expected_texts = model.encode_text(tokenizer(CAPTIONS), normalize=True).numpy()
    np.testing.assert_allclose(core.encode_images(pixels), expected_images, atol=1e-6)
    np.testing.assert_allclose(core.encode_texts(tokenizer(CAPTIONS)), expected_texts, atol=1e-6)


def test_missing_weights_fail_instead_of_serving_random(tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir / "open_clip_config.json", tmp_path / "open_clip_config.json")
    with pytest.raises(RuntimeError, match="pretrained"):
        load_model(ModelSpec(model=f"local-dir:{tmp_path}"), "cpu", "fp32")


def test_explicit_random_weights_build_a_builtin_architecture():
    model = load_model(ModelSpec(model="RN50", pretrained="random"), "cpu", "fp32")
    assert isinstance(model, torch.nn.Module)


HUB_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch, open_clip
    from serve_app.config import AppArgs
    from serve_app.encoder import EncoderCore
    from serve_app.preprocess import ModelPreprocessing
    spec = AppArgs().model_specs()[0]          # the default: hf-hub:laion/CLIP-ViT-g-14-laion2B-s34B-b88K
    pre = ModelPreprocessing(spec, AppArgs().image_limits)
    core = EncoderCore(spec)
    reference = open_clip.create_model(spec.model).eval()
    tokens = pre.texts(["a hub cat"]).tokens
    with torch.no_grad():
        expected = reference.encode_text(tokens, normalize=True).numpy()
    print(json.dumps({"name": spec.name, "size": pre.config.image_size,
                      "diff": float(np.abs(core.encode_texts(tokens) - expected).max())}))
    """
)


def test_default_hub_id_loads_from_an_offline_hugging_face_cache(tmp_path, tiny_model_dir):
    """Emulates the HF cache layout for the default repo id; HF_HUB_OFFLINE=1 proves nothing is fetched."""
    repo = tmp_path / "hub" / "models--laion--CLIP-ViT-g-14-laion2B-s34B-b88K"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copy(tiny_model_dir / name, snapshot / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["name"] == "laion/CLIP-ViT-g-14-laion2B-s34B-b88K"
    assert report["size"] == [48, 48]
    assert report["diff"] < 1e-6


def test_hub_id_without_cache_offline_fails_clearly(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "serve_app.modeling", "hf-hub:laion/CLIP-ViT-g-14-laion2B-s34B-b88K"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "cannot fetch hf-hub:laion/CLIP-ViT-g-14-laion2B-s34B-b88K" in result.stderr

