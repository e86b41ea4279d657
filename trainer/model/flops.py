"""Floating-point operations of one training step, counted from the model's shapes: what a trial's
`achieved_tflops` and `mfu` divide by.

The count is the usual one for model FLOPs utilisation (PaLM, Megatron): every matrix product counts 2·m·n·k,
attention's two products count 4·S²·d per layer over the whole S×S square (no discount for the causal half,
which kernels that compute the square whole do not get either), and element-wise work (norms, activations,
rotary, softmax) is left out. A backward pass costs one forward for the gradients of a product's inputs and one
for those of its weights, each only where autograd needs it, so what trains (`TrainScope`) decides it: a frozen
vision tower runs forward only; LoRA's frozen decoder weights need input gradients but no weight gradients (the
adapters' own few FLOPs are left out). Gradient checkpointing runs each checkpointed layer's forward once more,
but its last product (fc2), whose output no backward needs: PyTorch's non-reentrant checkpoint stops there.

Everything is counted on the shapes that ran, padding included, since the hardware computed it. On the tiny
preset the count equals, to the FLOP, what `torch.utils.flop_counter.FlopCounterMode` measures of a real
forward and backward (tests/test_flops.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from trainer.model.choices import TrainScope
from trainer.model.config import MoondreamConfig, TextConfig, VisionConfig


@dataclass(frozen=True)
class Layers:
    """A stack of transformer layers' forward FLOPs, split by what a backward needs: `weights` (products with
    a weight matrix: one input and one weight gradient each) and `activations` (attention's products of two
    activations: two input gradients); `recomputed` is what gradient checkpointing runs again."""

    weights: int
    activations: int
    recomputed: int

    @property
    def total(self) -> int:
        return self.weights + self.activations


def _layers(n_layers: int, rows: int, tokens: int, attention_weights: int, d: int, ff: int) -> Layers:
    """`rows` sequences of `tokens` through `n_layers` layers of width `d`: attention projections of
    `attention_weights` parameters, attention over the whole square, an MLP d → ff → d."""
    fc2 = 2 * tokens * ff * d
    linear = 2 * tokens * attention_weights + 2 * tokens * d * ff + fc2
    attention = 4 * tokens * tokens * d
    per_layer = rows * n_layers
    return Layers(per_layer * linear, per_layer * attention, per_layer * (linear + attention - fc2))


def vision_layers(vision: VisionConfig, crops: int) -> Layers:
    """The SigLIP encoder's layers over `crops` crops."""
    d = vision.enc_dim
    return _layers(vision.enc_n_layers, crops, vision.n_image_tokens, 4 * d * d, d, vision.enc_ff_dim)


def patch_embedding(vision: VisionConfig, crops: int) -> int:
    """The convolution that turns each crop's patches into tokens."""
    return 2 * crops * vision.n_image_tokens * vision.in_channels * vision.enc_patch_size ** 2 * vision.enc_dim


def projection(vision: VisionConfig, images: int) -> tuple[int, int]:
    """The MLP from [global ‖ pooled local] features (2 × enc_dim) to the text width: (fc1, fc2)."""
    tokens = images * vision.n_image_tokens
    return (2 * tokens * 2 * vision.enc_dim * vision.proj_inner_dim,
            2 * tokens * vision.proj_inner_dim * vision.proj_out_dim)


def decoder_layers(text: TextConfig, rows: int, seq_len: int) -> Layers:
    """The Phi decoder's layers over `rows` sequences of `seq_len` positions: q and dense d × d, k and v
    d × (the key/value heads' width)."""
    d = text.dim
    kv = d * text.n_kv_heads // text.n_heads
    return _layers(text.n_layers, rows, seq_len, 2 * d * d + 2 * d * kv, d, text.ff_dim)


def lm_head(text: TextConfig, rows: int, logits: int) -> int:
    """The LM head on the last `logits` positions of each row (training keeps only the text positions)."""
    return 2 * rows * logits * text.dim * text.vocab_size


def train_step_flops(config: MoondreamConfig, scope: TrainScope, checkpointing: bool, *, crops: int, images: int,
                     text_len: int) -> int:
    """FLOPs of one micro-batch's forward and backward: `images` samples with `crops` crops in all, each
    sequence BOS + the image tokens + `text_len` text positions (padded), the loss on the text positions."""
    patch = patch_embedding(config.vision, crops)
    vision = vision_layers(config.vision, crops)
    fc1, fc2 = projection(config.vision, images)
    decoder = decoder_layers(config.text, images, 1 + config.vision.n_image_tokens + text_len)
    head = lm_head(config.text, images, text_len + 1)
    vision_trains = scope == "all"
    projection_trains = scope in ("text+projection", "all")

    forward = patch + vision.total + fc1 + fc2 + decoder.total + head
    # the decoder and its head: input gradients all the way down, weight gradients where their weights train
    backward = decoder.weights + 2 * decoder.activations + head
    if scope != "lora":
        backward += decoder.weights + head
    if projection_trains:  # weight gradients, fc2's input gradient, and fc1's when the tower below trains
        backward += fc1 + fc2 + fc2 + (fc1 if vision_trains else 0)
    if vision_trains:  # the patch embedding's weight gradient; the pixels need none
        backward += 2 * vision.weights + 2 * vision.activations + patch
    recompute = (decoder.recomputed + (vision.recomputed if vision_trains else 0)) if checkpointing else 0
    return forward + backward + recompute
