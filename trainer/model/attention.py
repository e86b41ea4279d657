"""Attention layouts (`causal`, `prefix`) as masks for each attention backend.

`prefix` lets BOS and the image tokens attend to each other in both directions,
as the official Moondream2 code does; text stays causal. Because the prefix comes
first, "prefix" is simply "causal, or the key lies inside the prefix".

Memory is the point of this module. The batches the trainer builds are padded on
the right, and a right-padded key is only ever seen by padded queries (whose loss
is ignored), so no per-sample padding mask is needed:
- `sdpa`: `causal` passes no mask at all (the kernel's own causal path); `prefix`
  passes one boolean `[1, 1, S, S]` mask broadcast over the batch.
- `flex`: a FlexAttention `BlockMask`, built from a mask function, never dense.
- `eager-4d`: the naive baseline, an explicit float `[batch, 1, S, S]` additive
  mask with eager attention. Kept only so benchmarks can show what it costs.
"""
from __future__ import annotations

import typing

import torch

from trainer.model.choices import AttentionBackend, AttentionMode

ATTENTION_MODES: tuple[str, ...] = typing.get_args(AttentionMode)
ATTENTION_BACKENDS: tuple[str, ...] = typing.get_args(AttentionBackend)

# the transformers attention implementation each backend runs on
TRANSFORMERS_IMPLEMENTATION = {"sdpa": "sdpa", "flex": "flex_attention", "eager-4d": "eager"}


def allowed(mode: AttentionMode, q_idx: torch.Tensor, kv_idx: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Whether query position `q_idx` may attend to key position `kv_idx` (broadcasting)."""
    causal = kv_idx <= q_idx
    if mode == "causal":
        return causal
    return causal | (kv_idx < prefix_len)


def dense_allowed(mode: AttentionMode, seq_len: int, prefix_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean `[S, S]` matrix of `allowed`; True where attention is permitted."""
    idx = torch.arange(seq_len, device=device)
    return allowed(mode, idx[:, None], idx[None, :], prefix_len)


def build_mask(
    mode: AttentionMode,
    backend: AttentionBackend,
    *,
    batch_size: int,
    seq_len: int,
    prefix_len: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
):
    """The `attention_mask` argument for the text decoder's forward pass.

    No key-padding mask: batches pad text at the right end only, where causal order already keeps real tokens
    from attending to padding, and padded positions carry no loss.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {mode!r}; choose from {ATTENTION_MODES}")
    if backend == "sdpa":
        if mode == "causal":
            return None
        return dense_allowed(mode, seq_len, prefix_len, device)[None, None]
    if backend == "flex":
        return _block_mask(mode, seq_len, prefix_len, device)
    if backend == "eager-4d":
        keep = dense_allowed(mode, seq_len, prefix_len, device)[None, None].expand(batch_size, 1, seq_len, seq_len)
        mask = torch.zeros(batch_size, 1, seq_len, seq_len, dtype=dtype, device=device)
        return mask.masked_fill(~keep, torch.finfo(dtype).min)
    raise ValueError(f"unknown attention backend {backend!r}; choose from {ATTENTION_BACKENDS}")


def _block_mask(mode: AttentionMode, seq_len: int, prefix_len: int, device: torch.device | str):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(mode, q_idx, kv_idx, prefix_len)
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)


# the ATen operator each of PyTorch's fused SDPA kernels runs as, by the kernel's name; the math kernel has none
# (it is composite: plain products and a softmax reach the dispatcher)
SDPA_KERNEL_OPS = {
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_flash_attention_for_cpu": "flash-cpu",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_fused_attention_overrideable": "fused",
}
KERNEL_OF_BACKEND = {"flex": "flex", "eager-4d": "eager"}


def attention_kernel(mode: AttentionMode, backend: AttentionBackend, *, heads: int, head_dim: int, prefix_len: int,
                     text_len: int, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel the decoder's attention runs on. For `sdpa` it is the one PyTorch's dispatcher picks for this
    layout's mask (none for `causal`, a boolean one for `prefix`), dtype and device, seen by running one call
    with gradients on, as training does: a boolean mask keeps the flash kernel out on CUDA, and which kernel
    takes over changes between releases and GPUs, so it is read, not assumed."""
    if backend != "sdpa":
        return KERNEL_OF_BACKEND[backend]
    from torch.utils._python_dispatch import TorchDispatchMode

    class KernelSeen(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.kernels: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in SDPA_KERNEL_OPS:
                self.kernels.append(SDPA_KERNEL_OPS[name])
            return func(*args, **(kwargs or {}))

    seq_len = prefix_len + text_len
    mask = build_mask(mode, "sdpa", batch_size=1, seq_len=seq_len, prefix_len=prefix_len, device=device)
    q = torch.zeros(1, heads, seq_len, head_dim, device=device, dtype=dtype, requires_grad=True)
    with torch.enable_grad(), KernelSeen() as seen:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=mask is None)
    return seen.kernels[0] if seen.kernels else "math"
