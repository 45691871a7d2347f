"""Writes a random-weight Hugging Face `CLIPModel` directory for infinity-emb, fully offline.

Standalone on purpose: `compare` runs it with the `python` beside `--infinity-bin` (infinity-emb's own
environment, which has transformers), so it imports nothing from `serve_app`. `CLIPConfig()` has ViT-B/32 sizes; the tokenizer files
are rebuilt from open_clip's `bpe_simple_vocab_16e6.txt.gz`, the same BPE that CLIP's tokenizer uses.

    INFINITY_ENV/bin/python hf_clip.py OUT_DIR --bpe .../open_clip/bpe_simple_vocab_16e6.txt.gz
"""

import argparse
import gzip
import json
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character map (as in open_clip's tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer_files(bpe_path: Path, out: Path) -> None:
    """vocab.json + merges.txt exactly as open_clip's SimpleTokenizer builds its vocabulary."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")


def write_clip_dir(out: Path, bpe_path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, CLIPTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = CLIPConfig()
    config.max_length = 77  # else infinity truncates text at the generation default of 20 tokens
    config.text_config.max_length = 77
    model = CLIPModel(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer_files(bpe_path, out)
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                   unk_token="<|endoftext|>", model_max_length=77)
    slow = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), **special)
    fast = CLIPTokenizerFast(vocab_file=str(out / "vocab.json"), merges_file=str(out / "merges.txt"), **special)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=fast)
    slow.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--bpe", type=Path, required=True, help="open_clip's bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_clip_dir(args.out, args.bpe, args.seed))


if __name__ == "__main__":
    main()
