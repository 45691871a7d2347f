"""Writes a tiny, randomly initialised open_clip model in open_clip's `local-dir:` layout.

For `make serve-dev` and the tests: fully offline, loads in a second. Its preprocess config is
deliberately not open_clip's default (size, mean/std, interpolation), so tests catch hard-coded values.

    python -m serve_app.dev_model /tmp/tiny-clip
"""

import argparse
import json
from pathlib import Path
from typing import Any

TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_PREPROCESS_CFG: dict[str, Any] = {
    "mean": [0.5, 0.4, 0.3],
    "std": [0.2, 0.25, 0.3],
    "interpolation": "bilinear",
    "resize_mode": "shortest",
}


def write_tiny_model(
    directory: str | Path,
    seed: int = 0,
    model_cfg: dict[str, Any] | None = None,
    preprocess_cfg: dict[str, Any] | None = None,
) -> Path:
    """Creates `open_clip_config.json` + `open_clip_model.safetensors`; returns the directory."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_cfg = model_cfg or TINY_MODEL_CFG
    preprocess_cfg = preprocess_cfg or TINY_PREPROCESS_CFG
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_tiny_model(args.directory, seed=args.seed))


if __name__ == "__main__":
    main()
