"""Moondream2 assembled from transformers' SigLIP vision tower and Phi decoder.

Using the library's modules (instead of a hand-written transformer) means the
attention backends, gradient checkpointing and KV cache are the well-tested ones;
what this module adds is the Moondream glue: multi-crop feature stitching, the
projection MLP, and the `[BOS] + image + text` sequence with its attention layout.
"""
from __future__ import annotations

import typing
from typing import Sequence

import torch
from torch import nn
from transformers import PhiForCausalLM, SiglipVisionModel

from trainer.model.attention import TRANSFORMERS_IMPLEMENTATION, build_mask
from trainer.model.config import MoondreamConfig
from trainer.model.image_crops import pool_to_grid, stitch_local_features
from trainer.model.choices import AttentionBackend, AttentionMode, TrainScope

TRAIN_SCOPES: tuple[str, ...] = typing.get_args(TrainScope)


class ProjectionMLP(nn.Module):
    """Maps [global ‖ pooled local] vision features (2 × enc_dim) into the text width."""

    def __init__(self, in_dim: int, inner_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, inner_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MoondreamModel(nn.Module):
    def __init__(self, config: MoondreamConfig, *, bos_id: int, attention_backend: AttentionBackend = "sdpa") -> None:
        super().__init__()
        if attention_backend not in TRANSFORMERS_IMPLEMENTATION:
            raise ValueError(f"unknown attention backend {attention_backend!r}; "
                             f"choose from {sorted(TRANSFORMERS_IMPLEMENTATION)}")
        implementation = TRANSFORMERS_IMPLEMENTATION[attention_backend]
        self.config = config
        self.bos_id = bos_id
        self.attention_backend = attention_backend
        self.gradient_checkpointing = False
        self.vision = SiglipVisionModel(config.siglip_config(implementation))
        v = config.vision
        self.projection = ProjectionMLP(2 * v.enc_dim, v.proj_inner_dim, v.proj_out_dim)
        self.text = PhiForCausalLM(config.phi_config(implementation))
        if v.proj_out_dim != config.text.dim:
            raise ValueError(f"vision proj_out_dim {v.proj_out_dim} must equal text dim {config.text.dim}")

    @property
    def prefix_len(self) -> int:
        """BOS plus the image tokens: the block that `prefix` attention makes bidirectional."""
        return 1 + self.config.vision.n_image_tokens

    # -- configuration -------------------------------------------------------------

    def set_train_scope(self, scope: TrainScope) -> None:
        """What trains; `lora` trains only adapters already added to the text decoder (trainer.model.lora)."""
        if scope not in TRAIN_SCOPES:
            raise ValueError(f"unknown train scope {scope!r}; choose from {TRAIN_SCOPES}")
        self.vision.requires_grad_(scope == "all")
        self.projection.requires_grad_(scope in ("text+projection", "all"))
        self.text.requires_grad_(scope != "lora")
        if scope == "lora":
            adapters = [p for name, p in self.text.named_parameters() if ".lora_" in name]
            if not adapters:
                raise ValueError("train scope 'lora' needs adapters on the text decoder (trainer.model.lora.add_lora)")
            for p in adapters:
                p.requires_grad_(True)

    def store_weights(self, trained: torch.dtype, frozen: torch.dtype) -> None:
        """Keep trained and frozen parameters in their own types (see trainer.memory.precision); call after
        set_train_scope. Buffers (rotary frequencies) stay as they are."""
        for p in self.parameters():
            dtype = trained if p.requires_grad else frozen
            if p.dtype != dtype:
                p.data = p.data.to(dtype)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.gradient_checkpointing = enabled
        for tower in (self.vision, self.text):
            if enabled:
                tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                tower.activation_checkpointing_disable()

    # -- image side ----------------------------------------------------------------

    def encode_images(self, crops: torch.Tensor, tilings: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Normalised crops of several images (each: global crop, then its tiles) → `[n_images, N, dim]`.

        All crops of a batch go through the vision tower in one call; towers that are
        frozen run without autograd so they cost no activation memory.
        """
        v = self.config.vision
        vision_trains = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and vision_trains):
            # the tower's own storage type: frozen towers may be kept in half precision
            pixels = crops.to(self.vision.embeddings.patch_embedding.weight.dtype)
            features = self.vision(pixel_values=pixels).last_hidden_state
        combined = []
        start = 0
        for rows, cols in tilings:
            count = 1 + rows * cols
            local = features[start + 1: start + count].reshape(rows * cols, v.grid, v.grid, v.enc_dim)
            stitched = stitch_local_features(local, (rows, cols), v.overlap_margin)
            combined.append(torch.cat([features[start], pool_to_grid(stitched, v.grid)], dim=-1))
            start += count
        if start != crops.shape[0]:
            raise ValueError(f"tilings account for {start} crops but {crops.shape[0]} were given")
        projection_trains = any(p.requires_grad for p in self.projection.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and projection_trains):
            return self.projection(torch.stack(combined).to(self.projection.fc1.weight.dtype))

    # -- text side -----------------------------------------------------------------

    def embed_sequence(self, image_embeddings: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """`[BOS] + image embeddings + text` as input embeddings `[batch, 1 + N + T, dim]`."""
        embed = self.text.get_input_embeddings()
        batch = image_embeddings.shape[0]
        bos = embed(torch.full((batch, 1), self.bos_id, dtype=torch.long, device=text_ids.device))
        return torch.cat([bos, image_embeddings.to(bos.dtype), embed(text_ids)], dim=1)

    def text_logits(
        self,
        image_embeddings: torch.Tensor,
        text_ids: torch.Tensor,
        mode: AttentionMode,
        *,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits over the whole sequence, or only its last `logits_to_keep` positions.

        Training keeps only the text positions: the LM head over 730 image positions
        would be most of the logits memory and none of the loss.
        """
        embeds = self.embed_sequence(image_embeddings, text_ids)
        mask = build_mask(mode, self.attention_backend, batch_size=embeds.shape[0], seq_len=embeds.shape[1],
                          prefix_len=self.prefix_len, device=embeds.device)
        return self.text(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                         logits_to_keep=logits_to_keep).logits

    def answer_loss(
        self,
        crops: torch.Tensor,
        tilings: Sequence[tuple[int, int]],
        text_ids: torch.Tensor,
        labels: torch.Tensor,
        mode: AttentionMode,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over labelled text tokens (answer + EOS; others are -100).

        A sum, not a mean: the caller divides by the labelled tokens of the whole
        accumulated batch, so grad_accum × small batches give the gradient of one
        large batch even when answers differ in length.
        Returns (loss sum, correct token count, labelled token count). `text_ids` must be
        right-padded; the logit at position p predicts the token at p + 1, so the
        last image token predicts the first text token.
        """
        image_embeddings = self.encode_images(crops, tilings)
        logits = self.text_logits(image_embeddings, text_ids, mode, logits_to_keep=text_ids.shape[1] + 1)
        logits = logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum")
        labelled = labels != -100
        correct = ((logits.argmax(-1) == labels) & labelled).sum()
        return loss, correct, labelled.sum()
