"""Official Moondream2 (2025 layout) weights ⇄ the transformers modules of `MoondreamModel`.

The official checkpoint fuses q, k and v into one `qkv` matrix and stores the patch
embedding as a linear layer over (channel, row, column)-flattened patches; SigLIP and
Phi keep them apart and use a convolution. The table below is the single source of
truth for both directions, so a model saved here loads in the official code.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.config import WEIGHTS_FILE, MoondreamConfig

# official keys for parts this project does not model (the object-detection region head)
IGNORED_PREFIXES = ("model.region.",)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the file and key."""


@dataclass(frozen=True)
class KeyMapping:
    official: str
    ours: tuple[str, ...]  # several when the official tensor is fused (qkv)
    official_shape: tuple[int, ...]
    our_shapes: tuple[tuple[int, ...], ...]

    def to_ours(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if len(self.ours) == 1:
            return [tensor.reshape(self.our_shapes[0])]
        return list(torch.split(tensor, [s[0] for s in self.our_shapes], dim=0))

    def to_official(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors, dim=0).reshape(self.official_shape)


def key_mappings(config: MoondreamConfig) -> list[KeyMapping]:
    v, t = config.vision, config.text
    maps: list[KeyMapping] = []

    def same(official: str, ours: str, *shape: int) -> None:
        maps.append(KeyMapping(official, (ours,), shape, (shape,)))

    def linear(official: str, ours: str, out_dim: int, in_dim: int) -> None:
        same(f"{official}.weight", f"{ours}.weight", out_dim, in_dim)
        same(f"{official}.bias", f"{ours}.bias", out_dim)

    def norm(official: str, ours: str, dim: int) -> None:
        same(f"{official}.weight", f"{ours}.weight", dim)
        same(f"{official}.bias", f"{ours}.bias", dim)

    def fused_qkv(official: str, ours: list[str], sizes: list[int], in_dim: int) -> None:
        maps.append(KeyMapping(f"{official}.weight", tuple(f"{o}.weight" for o in ours), (sum(sizes), in_dim),
                               tuple((s, in_dim) for s in sizes)))
        maps.append(KeyMapping(f"{official}.bias", tuple(f"{o}.bias" for o in ours), (sum(sizes),),
                               tuple((s,) for s in sizes)))

    p, c, d = v.enc_patch_size, v.in_channels, v.enc_dim
    maps.append(KeyMapping("model.vision.patch_emb.weight", ("vision.embeddings.patch_embedding.weight",),
                           (d, c * p * p), ((d, c, p, p),)))
    same("model.vision.patch_emb.bias", "vision.embeddings.patch_embedding.bias", d)
    maps.append(KeyMapping("model.vision.pos_emb", ("vision.embeddings.position_embedding.weight",),
                           (1, v.n_image_tokens, d), ((v.n_image_tokens, d),)))
    for i in range(v.enc_n_layers):
        src, dst = f"model.vision.blocks.{i}", f"vision.encoder.layers.{i}"
        norm(f"{src}.ln1", f"{dst}.layer_norm1", d)
        fused_qkv(f"{src}.attn.qkv", [f"{dst}.self_attn.{n}_proj" for n in "qkv"], [d, d, d], d)
        linear(f"{src}.attn.proj", f"{dst}.self_attn.out_proj", d, d)
        norm(f"{src}.ln2", f"{dst}.layer_norm2", d)
        linear(f"{src}.mlp.fc1", f"{dst}.mlp.fc1", v.enc_ff_dim, d)
        linear(f"{src}.mlp.fc2", f"{dst}.mlp.fc2", d, v.enc_ff_dim)
    norm("model.vision.post_ln", "vision.post_layernorm", d)
    linear("model.vision.proj_mlp.fc1", "projection.fc1", v.proj_inner_dim, 2 * d)
    linear("model.vision.proj_mlp.fc2", "projection.fc2", v.proj_out_dim, v.proj_inner_dim)

    head_dim = t.dim // t.n_heads
    same("model.text.wte", "text.model.embed_tokens.weight", t.vocab_size, t.dim)
    for i in range(t.n_layers):
        src, dst = f"model.text.blocks.{i}", f"text.model.layers.{i}"
        norm(f"{src}.ln", f"{dst}.input_layernorm", t.dim)
        fused_qkv(f"{src}.attn.qkv", [f"{dst}.self_attn.{n}_proj" for n in "qkv"],
                  [t.n_heads * head_dim, t.n_kv_heads * head_dim, t.n_kv_heads * head_dim], t.dim)
        linear(f"{src}.attn.proj", f"{dst}.self_attn.dense", t.dim, t.n_heads * head_dim)
        linear(f"{src}.mlp.fc1", f"{dst}.mlp.fc1", t.ff_dim, t.dim)
        linear(f"{src}.mlp.fc2", f"{dst}.mlp.fc2", t.dim, t.ff_dim)
    norm("model.text.post_ln", "text.model.final_layernorm", t.dim)
    linear("model.text.lm_head", "text.lm_head", t.vocab_size, t.dim)
    return maps


def official_to_ours(tensors: dict[str, torch.Tensor], config: MoondreamConfig, source: str) -> dict[str, torch.Tensor]:
    """Convert an official state dict, checking every key and shape against `config`.

    Keys that are not model weights (`expected.*` in reference files) and the region
    head are skipped; any other unknown key is an error, since it means the config
    and the checkpoint disagree.
    """
    mappings = key_mappings(config)
    known = {m.official for m in mappings}
    region = sorted(k for k in tensors if k.startswith(IGNORED_PREFIXES))
    if region:
        warnings.warn(f"{source}: ignoring {len(region)} region-head tensors (model.region.*), "
                      "which this project does not train", stacklevel=2)
    unexpected = sorted(k for k in tensors if k.startswith("model.") and k not in known and k not in region)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all); "
                              "the checkpoint does not match the model config")
    ours: dict[str, torch.Tensor] = {}
    for m in mappings:
        if m.official not in tensors:
            raise CheckpointError(f"{source}: missing key {m.official!r}")
        tensor = tensors[m.official]
        if tuple(tensor.shape) != m.official_shape:
            raise CheckpointError(f"{source}: key {m.official!r} has shape {tuple(tensor.shape)}, "
                                  f"the model config expects {m.official_shape}")
        ours.update(zip(m.ours, m.to_ours(tensor)))
    return ours


def ours_to_official(state: dict[str, torch.Tensor], config: MoondreamConfig) -> dict[str, torch.Tensor]:
    return {m.official: m.to_official([state[k] for k in m.ours]).contiguous() for m in key_mappings(config)}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def load_official_weights(model: torch.nn.Module, path: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Load an official-layout safetensors file (or its already-read `tensors`) into a `MoondreamModel`."""
    converted = official_to_ours(tensors if tensors is not None else read_safetensors(path), model.config, str(path))
    current = model.state_dict()
    for key, tensor in converted.items():
        current[key].copy_(tensor.to(current[key].dtype))


def save_official_weights(model: torch.nn.Module, path: Path) -> None:
    """Write `model`'s weights in the official 2025 layout (float32 tensors → file dtype kept)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_file(ours_to_official(state, model.config), str(path), metadata={"format": "pt"})


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def fetch_from_hub(repo_id: str, revision: str | None) -> Path:
    """Download a checkpoint's weights, tokenizer and config; a clear error when offline."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=[WEIGHTS_FILE, "tokenizer.json", "*.json"]))
    except Exception as exc:  # network, auth and missing-revision errors all end here
        raise CheckpointError(
            f"could not fetch {repo_id}@{revision or 'main'} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Without network access, download the repository elsewhere and pass its local directory as the model."
        ) from exc
