"""oneDNN packed linears (serve_app/cpu_kernels.py): same embeddings as open_clip's own modules, and really used."""

import copy

import numpy as np
import open_clip
import pytest
import torch
from torch import nn

from serve_app import cpu_kernels
from serve_app.config import ModelSpec
from serve_app.cpu_kernels import PackedLinear, PackedSelfAttention, pack_transformer_linears, padded_rows
from serve_app.encoder import EncoderCore
from serve_app.modeling import encode_text

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="this torch build has no oneDNN packed linear")

CAPTIONS = ["a", "a photo of a cat", "an extremely long caption " * 30, "x y z"]


def packed_copy(model: nn.Module) -> nn.Module:
    packed = copy.deepcopy(model)
    assert pack_transformer_linears(packed) == 4  # two vision and two text blocks in the tiny model
    return packed


def test_packed_model_gives_open_clip_embeddings(reference):
    model, _, tokenizer = reference
    packed = packed_copy(model)
    torch.manual_seed(0)
    with torch.inference_mode():
        for batch in (1, 5):
            images = torch.randn(batch, 3, 48, 48)
            torch.testing.assert_close(packed.encode_image(images, normalize=True),
                                       model.encode_image(images, normalize=True), atol=1e-6, rtol=0)
        tokens = tokenizer(CAPTIONS)
        want = model.encode_text(tokens, normalize=True)
        # all 77 positions (open_clip's own encode_text), trimmed, and one caption at a time
        torch.testing.assert_close(packed.encode_text(tokens, normalize=True), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(encode_text(packed, tokens), want, atol=1e-6, rtol=0)
        alone = torch.cat([encode_text(packed, tokens[i : i + 1]) for i in range(len(CAPTIONS))])
        torch.testing.assert_close(alone, want, atol=1e-6, rtol=0)


def test_packing_replaces_the_layers_and_drops_the_dense_weights(reference):
    model, _, _ = reference
    packed = packed_copy(model)
    for block in packed.modules():
        if isinstance(block, open_clip.transformer.ResidualAttentionBlock):
            assert isinstance(block.attn, PackedSelfAttention)
            assert isinstance(block.mlp.c_fc, PackedLinear) and block.mlp.c_fc.activation == "gelu"
            assert isinstance(block.mlp.gelu, nn.Identity)
            assert isinstance(block.mlp.c_proj, PackedLinear)
            # open_clip still sees the dtype it reads (get_cast_dtype), without a second copy of the weights
            assert block.get_weight_dtype() == torch.float32 and block.mlp.c_fc.weight.is_meta
    assert not any(isinstance(m, nn.MultiheadAttention) for m in packed.modules())
    # text row counts are rounded (every length x batch size), the image tower's (batch x tokens) kept exact
    assert {m.round_rows for m in packed.visual.modules() if isinstance(m, PackedLinear)} == {False}
    assert {m.round_rows for m in packed.transformer.modules() if isinstance(m, PackedLinear)} == {True}
    # the blocks' linear weights live only in their packed form now: their parameters are the layer norms'
    blocks = [m for m in packed.modules() if isinstance(m, open_clip.transformer.ResidualAttentionBlock)]
    left = [name for block in blocks for name, p in block.named_parameters() if not p.is_meta]
    assert left and all(name.startswith(("ln_1.", "ln_2.")) for name in left), left


def test_quick_gelu_models_are_packed_without_fusing_the_activation(reference):
    model, _, tokenizer = reference
    quick = copy.deepcopy(model)
    for block in quick.modules():
        if isinstance(block, open_clip.transformer.ResidualAttentionBlock):
            block.mlp.gelu = open_clip.transformer.QuickGELU()
    packed = packed_copy(quick)
    block = packed.transformer.resblocks[0]
    assert isinstance(block.mlp.gelu, open_clip.transformer.QuickGELU) and block.mlp.c_fc.activation == "none"
    with torch.inference_mode():
        tokens = tokenizer(CAPTIONS)
        torch.testing.assert_close(encode_text(packed, tokens), quick.encode_text(tokens, normalize=True),
                                   atol=1e-6, rtol=0)


def test_row_counts_reach_onednn_in_few_sizes(monkeypatch):
    """Every text length in every batch size would be a kernel and a buffer size of its own (heap growth)."""
    assert [padded_rows(r) for r in (1, 10, 50, 64, 65, 127, 128, 129, 400, 1600, 4928)] == [
        1, 10, 50, 64, 68, 128, 128, 136, 400, 1600, 5120]
    assert all(r <= padded_rows(r) <= r * 1.0625 for r in range(1, 5000))
    linear = nn.Linear(24, 40)
    packed = PackedLinear.of(linear)
    seen = set()
    real = torch.ops.mkldnn._linear_pointwise

    def spy(x, *args):
        seen.add(x.shape[0])
        return real(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    with torch.inference_mode():
        for batch in range(1, 9):
            for length in range(1, 78):
                x = torch.randn(batch, length, 24)
                torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
    assert len(seen) == len({padded_rows(b * n) for b in range(1, 9) for n in range(1, 78)}) < 64 + 16 * 4


@pytest.mark.parametrize("mask_kind", ["none", "float", "bool"])
def test_packed_self_attention_equals_multihead_attention(mask_kind):
    torch.manual_seed(1)
    attention = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(3, 7, 64)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(7, 7) > 0.6
        mask.fill_diagonal_(False)  # every query keeps one key
    elif mask_kind == "float":
        mask = torch.randn(7, 7)
    with torch.inference_mode():
        want = attention(x, x, x, need_weights=False, attn_mask=mask)[0]
        got, weights = PackedSelfAttention(attention)(x, x, x, need_weights=False, attn_mask=mask)
    assert weights is None
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_packed_self_attention_refuses_what_it_does_not_compute():
    attention = PackedSelfAttention(nn.MultiheadAttention(16, 2, batch_first=True).eval())
    x, y = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    with pytest.raises(NotImplementedError):
        attention(x, y, y)
    with pytest.raises(NotImplementedError):
        attention(x, x, x, need_weights=True)
    assert not PackedSelfAttention.supports(nn.MultiheadAttention(16, 2))  # sequence-first
    assert not PackedSelfAttention.supports(nn.MultiheadAttention(16, 2, batch_first=True, kdim=8, vdim=8))


@pytest.mark.parametrize("kernels", ["onednn", "eager"])
def test_encoder_core_kernels_setting(tiny_model_dir, reference, kernels):
    model, _, tokenizer = reference
    core = EncoderCore(ModelSpec(model=f"local-dir:{tiny_model_dir}", torch_threads=1, cpu_kernels=kernels))
    assert core.kernels == kernels and core.packed_blocks == (4 if kernels == "onednn" else 0)
    with torch.inference_mode():
        want = model.encode_text(tokenizer(CAPTIONS), normalize=True).numpy()
    np.testing.assert_allclose(core.encode_texts(tokenizer(CAPTIONS)), want, atol=1e-6)


def test_encoder_core_runs_eager_where_onednn_is_missing(tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    core = EncoderCore(ModelSpec(model=f"local-dir:{tiny_model_dir}", torch_threads=1))
    assert core.kernels == "eager" and core.packed_blocks == 0
    assert "no oneDNN packed linear" in caplog.text
