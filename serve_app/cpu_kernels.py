"""oneDNN linear layers with weights packed once at load, for fp32 encoders on the CPU.

A ViT's forward pass is almost all linear layers. PyTorch runs an fp32 `nn.Linear` on the CPU through MKL's
sgemm; oneDNN's linear on a weight reordered once into its blocked layout is faster at every shape these
encoders use (torch.compile's CPU backend emits the same op for bf16 weights, but packs fp32 ones for MKL),
so the weights are reordered once at load and the dense copies dropped (BENCHMARKS.md, "oneDNN linear layers
with packed weights", which gives the measurements and the command that re-checks them). The arithmetic is
the same fp32 in another summation order: unit vectors agree with open_clip's within 1e-6
(tests/unit/test_cpu_kernels.py).

Only open_clip's own `Transformer` blocks are rewritten (the layers that carry the FLOPs): their MLP linears
(with GELU fused into the first when it is plain `nn.GELU`) and their self-attention's two projections.
Timm or Hugging Face towers and cross-attention are left as they are. Inference only: no autograd.
"""

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN chooses the blocked weight layout for this many rows; any row count runs on it (measured 1-1600).
_ROWS_HINT = 32


def padded_rows(rows: int) -> int:
    """Text row counts above 64 rounded up to 16 sizes per doubling (at most 1/16 more rows); 64 or fewer as they are.

    oneDNN creates (and caches) a kernel per input shape and sizes its scratch buffers by it; texts of every
    length in every batch size give thousands of shapes, and glibc's heap grows pass after pass with them
    while eager does not (BENCHMARKS.md, "oneDNN linear layers with packed weights"). Few shapes remain after
    rounding. Small row counts are few already, and padding them costs time, so they stay exact.
    """
    if rows <= 64:
        return rows
    step = 1 << (rows.bit_length() - 5)
    return -(-rows // step) * step


def available() -> bool:
    """oneDNN and the packed-linear ops exist in this torch build (x86-64 and aarch64 wheels have them)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise
        torch.ops.mkldnn._reorder_linear_weight
    except (AttributeError, RuntimeError):
        return False
    return True


class PackedLinear(nn.Linear):
    """`y = act(x @ W.T + b)` through oneDNN on `W` packed at construction.

    Still an `nn.Linear` for `isinstance` checks (open_clip's own). `weight` becomes a meta tensor, so
    its shape and dtype stay visible (open_clip reads `c_fc.weight.dtype`) without a second copy in memory;
    anything that tried to compute with it fails loudly instead of silently.
    """

    round_rows = True  # `padded_rows`; the image tower's row counts are few (batch x tokens per image)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none",
                 approximate: str = "") -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)
        self.bias = None if bias is None else bias.detach().contiguous()
        self.weight = torch.empty_like(weight, device="meta")
        self.activation = activation
        self.approximate = approximate

    @classmethod
    def of(cls, linear: nn.Linear, gelu: nn.GELU | None = None) -> "PackedLinear":
        if gelu is None:
            return cls(linear.weight, linear.bias)
        return cls(linear.weight, linear.bias, "gelu", gelu.approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading, width = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, width)
        rows = x.shape[0]
        padded = padded_rows(rows) if self.round_rows else rows
        if padded != rows:  # rows are independent: zero rows in, their outputs dropped
            x = F.pad(x, (0, 0, 0, padded - rows))
        out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, self.activation, [],
                                                 self.approximate)
        return out[:rows].reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed=onednn, activation={self.activation}"


class PackedSelfAttention(nn.Module):
    """What `nn.MultiheadAttention(batch_first=True)` computes for self-attention without weights returned.

    One packed projection to q, k and v, PyTorch's `scaled_dot_product_attention` (same 1/sqrt(head_dim)
    scale; a float mask is added, a boolean one masks where True, as in MultiheadAttention), one packed
    output projection.
    """

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.num_heads = attention.num_heads
        self.in_proj = PackedLinear(attention.in_proj_weight, attention.in_proj_bias)
        self.out_proj = PackedLinear.of(attention.out_proj)

    @staticmethod
    def supports(attention: nn.Module) -> bool:
        return (
            type(attention) is nn.MultiheadAttention
            and attention.batch_first
            and attention._qkv_same_embed_dim
            and attention.bias_k is None
            and not attention.add_zero_attn
        )

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query or need_weights:
            raise NotImplementedError("packed attention serves self-attention without attention weights only")
        batch, length, width = query.shape
        qkv = self.in_proj(query).view(batch, length, 3, self.num_heads, width // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(attn_mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width)), None


def pack_transformer_linears(model: nn.Module) -> int:
    """Rewrites every open_clip `ResidualAttentionBlock` of an fp32 CPU model in place; returns how many."""
    from open_clip.transformer import ResidualAttentionBlock

    blocks = 0
    for block in model.modules():
        if not isinstance(block, ResidualAttentionBlock):
            continue
        mlp = block.mlp  # open_clip's Sequential(c_fc, gelu, c_proj); anything else is left as it is
        if type(getattr(mlp, "c_fc", None)) is nn.Linear and type(getattr(mlp, "c_proj", None)) is nn.Linear:
            if type(getattr(mlp, "gelu", None)) is nn.GELU:
                mlp.c_fc, mlp.gelu = PackedLinear.of(mlp.c_fc, gelu=mlp.gelu), nn.Identity()
            else:
                mlp.c_fc = PackedLinear.of(mlp.c_fc)
            mlp.c_proj = PackedLinear.of(mlp.c_proj)
        if not hasattr(block, "ln_1_kv") and PackedSelfAttention.supports(block.attn):
            block.attn = PackedSelfAttention(block.attn)
        blocks += 1
    # An image pass has batch x (tokens per image) rows, at most max_batch_size shapes: kept exact, as
    # rounding would add rows to a compute-bound pass (ViT-g/14: 257 rows per image would become 272).
    for module in getattr(model, "visual", nn.Identity()).modules():
        if isinstance(module, PackedLinear):
            module.round_rows = False
    return blocks
