"""Attention layouts: who sees whom, and the three backends agree with a dense reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.model.attention import build_mask, dense_allowed
from trainer.model.config import PRESETS
from trainer.model.network import MoondreamModel

TINY = PRESETS["tiny"]
N_IMAGE = TINY.vision.n_image_tokens
PREFIX = 1 + N_IMAGE


def test_prefix_image_token_sees_later_image_tokens_causal_does_not():
    prefix = dense_allowed("prefix", PREFIX + 5, PREFIX)
    causal = dense_allowed("causal", PREFIX + 5, PREFIX)
    assert prefix[1, N_IMAGE]  # first image token sees the last one
    assert prefix[0, PREFIX - 1]  # BOS sees the whole image
    assert not causal[1, N_IMAGE]
    assert not prefix[1, PREFIX]  # image tokens never see text


@pytest.mark.parametrize("mode", ["causal", "prefix"])
def test_text_token_never_sees_a_later_token(mode):
    allowed = dense_allowed(mode, PREFIX + 6, PREFIX)
    for q in range(PREFIX, PREFIX + 6):
        assert not allowed[q, q + 1:].any()
        assert allowed[q, : q + 1].all()


def test_sdpa_masks_stay_lean():
    assert build_mask("causal", "sdpa", batch_size=8, seq_len=100, prefix_len=10, device="cpu") is None
    mask = build_mask("prefix", "sdpa", batch_size=8, seq_len=100, prefix_len=10, device="cpu")
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 100, 100)  # broadcast over the batch
    naive = build_mask("prefix", "eager-4d", batch_size=8, seq_len=100, prefix_len=10, device="cpu")
    assert naive.dtype == torch.float32 and naive.shape == (8, 1, 100, 100)


def _models(backends):
    torch.manual_seed(0)
    first = MoondreamModel(TINY, bos_id=0, attention_backend=backends[0]).eval()
    models = [first]
    for backend in backends[1:]:
        other = MoondreamModel(TINY, bos_id=0, attention_backend=backend).eval()
        other.load_state_dict(first.state_dict())
        models.append(other)
    return models


def dense_reference_logits(model: MoondreamModel, embeds: torch.Tensor, mode: str) -> torch.Tensor:
    """The Phi decoder written out with plain tensor ops and a dense boolean mask."""
    t = model.config.text
    heads, head_dim = t.n_heads, t.dim // t.n_heads
    rot = head_dim // 2
    seq = embeds.shape[1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    angles = torch.arange(seq).float()[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rotate(x):
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        half = torch.cat([-x_rot[..., rot // 2:], x_rot[..., : rot // 2]], -1)
        return torch.cat([x_rot * cos + half * sin, x_pass], -1)

    allowed = dense_allowed(mode, seq, model.prefix_len)
    x = embeds
    for layer in model.text.model.layers:
        h = F.layer_norm(x, (t.dim,), layer.input_layernorm.weight, layer.input_layernorm.bias, 1e-5)
        a = layer.self_attn

        def split(proj):
            return proj(h).view(h.shape[0], seq, heads, head_dim).transpose(1, 2)

        q, k, v = rotate(split(a.q_proj)), rotate(split(a.k_proj)), split(a.v_proj)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        scores = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        attn = a.dense((scores @ v).transpose(1, 2).reshape(h.shape[0], seq, t.dim))
        mlp = layer.mlp.fc2(F.gelu(layer.mlp.fc1(h), approximate="tanh"))
        x = x + attn + mlp
    final = model.text.model.final_layernorm
    x = F.layer_norm(x, (t.dim,), final.weight, final.bias, 1e-5)
    return model.text.lm_head(x)


@pytest.mark.parametrize("mode", ["causal", "prefix"])
def test_backends_agree_with_dense_reference(mode):
    sdpa, eager = _models(["sdpa", "eager-4d"])
    image = torch.randn(2, N_IMAGE, TINY.text.dim)
    ids = torch.randint(1, 90, (2, 7))
    with torch.no_grad():
        reference = dense_reference_logits(sdpa, sdpa.embed_sequence(image, ids), mode)
        for model in (sdpa, eager):
            logits = model.text_logits(image, ids, mode)
            torch.testing.assert_close(logits, reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["causal", "prefix"])
def test_layout_is_what_the_model_computes(mode):
    """Changing a late image token moves early image outputs only under `prefix`;
    changing a text token never moves anything before it."""
    (model,) = _models(["sdpa"])
    image = torch.randn(1, N_IMAGE, TINY.text.dim)
    ids = torch.randint(1, 90, (1, 6))
    with torch.no_grad():
        base = model.text_logits(image, ids, mode)
        late_image = image.clone()
        late_image[0, -1] = torch.randn(TINY.text.dim)  # not a constant shift: LayerNorm would remove it
        moved = (model.text_logits(late_image, ids, mode) - base)[0, 1].abs().max()
        later_text = ids.clone()
        later_text[0, 4] = (ids[0, 4] % 90) + 1
        text_moved = (model.text_logits(image, later_text, mode) - base)[0, : PREFIX + 4].abs().max()
    assert (moved > 1e-4) == (mode == "prefix")
    assert text_moved == 0


@pytest.mark.parametrize("backend", ["sdpa", "eager-4d"])
def test_right_padding_does_not_change_real_tokens(backend):
    (model,) = _models([backend])
    image = torch.randn(2, N_IMAGE, TINY.text.dim)
    short = torch.randint(1, 90, (1, 4))
    padded = torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1)
    long = torch.randint(1, 90, (1, 7))
    with torch.no_grad():
        batch = model.text_logits(image, torch.cat([padded, long]), "prefix")
        alone = model.text_logits(image[:1], short, "prefix")
    torch.testing.assert_close(batch[0, : PREFIX + 4], alone[0], atol=1e-5, rtol=1e-4)


def test_flex_block_mask_matches_sdpa_forward():
    """FlexAttention trains only on CUDA in torch 2.13, but its forward runs (compiled) on CPU."""
    sdpa, flex = _models(["sdpa", "flex"])
    image = torch.randn(2, N_IMAGE, TINY.text.dim)
    ids = torch.randint(1, 90, (2, 7))
    with torch.no_grad():
        for mode in ("causal", "prefix"):
            torch.testing.assert_close(flex.text_logits(image, ids, mode), sdpa.text_logits(image, ids, mode),
                                       atol=2e-5, rtol=1e-4)
