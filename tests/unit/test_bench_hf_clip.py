"""serve_app.bench.hf_clip: the tokenizer files of infinity-emb's random HF CLIP are open_clip's own."""

import json
from pathlib import Path


def test_hf_tokenizer_files_match_open_clip(tmp_path: Path):
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    from serve_app.bench.hf_clip import write_tokenizer_files

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    write_tokenizer_files(bpe, tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    reference = SimpleTokenizer(str(bpe)).encoder  # open_clip names its two special tokens differently
    assert {k: v for k, v in vocab.items() if v < 49406} == {k: v for k, v in reference.items() if v < 49406}
    assert vocab["<|startoftext|>"] == reference["<start_of_text>"] == 49406
    assert vocab["<|endoftext|>"] == reference["<end_of_text>"] == 49407
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")
