"""Official Moondream2 weights ⇄ the transformers modules of `MoondreamModel`.

The official checkpoint fuses q, k and v into one `qkv` matrix and stores the patch
embedding as a linear layer over (channel, row, column)-flattened patches; SigLIP and
Phi keep them apart and use a convolution. The table below (in the 2025 names) is the
single source of truth for both directions, so a model saved here loads in the
official code. Checkpoints are read in every layout the official loader accepts (the
2024 names of the revisions users pin for captcha fine-tuning, the 2025 names with or
without `model.`, `torch.compile`'s `._orig_mod` infixes, any float dtype) and always
written in the 2025 layout.
"""
from __future__ import annotations

import json
import math
import re
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open

from trainer.model.config import WEIGHTS_FILE, MoondreamConfig
from trainer.files import atomic_path

# the dtypes of the safetensors format that model weights come in, by their names in a file's header
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


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


# The layouts the official loader accepts, each a renaming of the 2025 names (the canonical ones, used by
# `key_mappings`). Checkpoints saved by `torch.compile`d modules carry `._orig_mod` in their names; it is
# removed before matching, as the official loader does.
ORIG_MOD = "._orig_mod"
_RENAMES_2024: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(pattern), repl) for pattern, repl in (
    (r"^model\.vision\.patch_emb\.", "vision_encoder.encoder.model.visual.patch_embed.linear."),
    (r"^model\.vision\.pos_emb$", "vision_encoder.encoder.model.visual.pos_embed"),
    (r"^model\.vision\.post_ln\.", "vision_encoder.encoder.model.visual.norm."),
    (r"^model\.vision\.blocks\.(\d+)\.ln(\d)\.", r"vision_encoder.encoder.model.visual.blocks.\1.norm\2."),
    (r"^model\.vision\.blocks\.", "vision_encoder.encoder.model.visual.blocks."),
    (r"^model\.vision\.proj_mlp\.", "vision_encoder.projection.mlp."),
    (r"^model\.text\.wte$", "text_model.transformer.embd.wte.weight"),
    (r"^model\.text\.post_ln\.", "text_model.lm_head.ln."),
    (r"^model\.text\.lm_head\.", "text_model.lm_head.linear."),
    (r"^model\.text\.blocks\.(\d+)\.attn\.qkv\.", r"text_model.transformer.h.\1.mixer.Wqkv."),
    (r"^model\.text\.blocks\.(\d+)\.attn\.proj\.", r"text_model.transformer.h.\1.mixer.out_proj."),
    (r"^model\.text\.blocks\.", "text_model.transformer.h."),
))


def _rename_2024(name: str) -> str:
    for pattern, replacement in _RENAMES_2024:
        if pattern.search(name):
            return pattern.sub(replacement, name, count=1)
    return name


@dataclass(frozen=True)
class Layout:
    """One naming of the official weights: its label, how a 2025 name reads in it, and the prefixes of its
    model tensors (a key outside them, such as a reference file's `expected.*`, is not a weight)."""

    name: str
    rename: Callable[[str], str]
    prefixes: tuple[str, ...]
    region_prefix: str  # the object-detection head, which this project does not model


LAYOUTS: tuple[Layout, ...] = (
    Layout("2025", lambda name: name, ("model.",), "model.region."),
    Layout("2025 without the 'model.' prefix", lambda name: name.removeprefix("model."),
           ("vision.", "text.", "region."), "region."),
    Layout("2024", _rename_2024, ("vision_encoder.", "text_model.", "region_model."), "region_model."),
)


@dataclass(frozen=True)
class CheckpointKeys:
    """Where each canonical (2025) tensor lies in one checkpoint file, resolved from its names alone."""

    layout: Layout
    names: dict[str, str]  # canonical name -> name in the file
    region: int  # region-head tensors present and skipped


def match_layout(shapes: dict[str, tuple[int, ...]], config: MoondreamConfig, source: str) -> CheckpointKeys:
    """The layout `shapes` (a file's names and shapes) is written in, every tensor and shape checked against
    `config`. A wrong shape is named first, since it means that the config and the file disagree; then a file
    that fits no layout is named with the layout it came closest to and its first missing key, and an unknown
    key is named."""
    by_plain = {name.replace(ORIG_MOD, ""): name for name in shapes}
    mappings = key_mappings(config)

    def present(layout: Layout) -> int:
        return sum(layout.rename(m.official) in by_plain for m in mappings)

    layout = max(LAYOUTS, key=present)  # ties go to the first, the layout this project writes
    expected = {layout.rename(m.official): m for m in mappings}
    for name, m in expected.items():  # a wrong shape first: it says that the config and the file disagree
        if name in by_plain and tuple(shapes[by_plain[name]]) != m.official_shape:
            raise CheckpointError(f"{source}: key {name!r} has shape {tuple(shapes[by_plain[name]])}, the model "
                                  f"config expects {m.official_shape}")
    missing = [name for name in expected if name not in by_plain]
    if missing:
        found = present(layout)
        closest = (f"it fits none of the official layouts; closest is the {layout.name} layout "
                   f"({found} of {len(expected)} keys)") if found else "it holds no Moondream2 weights"
        raise CheckpointError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing; {closest})")
    region = [n for n in by_plain if n.startswith(layout.region_prefix)]
    unexpected = sorted(n for n in by_plain if n.startswith(layout.prefixes) and n not in expected
                        and not n.startswith(layout.region_prefix))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} in all); "
                              "the checkpoint does not match the model config")
    return CheckpointKeys(layout, {m.official: by_plain[name] for name, m in expected.items()}, len(region))


def _warn_region(keys: CheckpointKeys, source: str) -> None:
    if keys.region:
        warnings.warn(f"{source}: ignoring {keys.region} region-head tensors ({keys.layout.region_prefix}*), "
                      "which this project does not train", stacklevel=3)


def official_to_ours(tensors: dict[str, torch.Tensor], config: MoondreamConfig, source: str) -> dict[str, torch.Tensor]:
    """Convert an official state dict in any accepted layout, checking every key and shape against `config`."""
    keys = match_layout({k: tuple(v.shape) for k, v in tensors.items()}, config, source)
    _warn_region(keys, source)
    ours: dict[str, torch.Tensor] = {}
    for m in key_mappings(config):
        ours.update(zip(m.ours, m.to_ours(tensors[keys.names[m.official]])))
    return ours


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """A lazily read safetensors file (tensors come off disk one at a time), errors naming the file."""
    try:
        handle = safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    with handle as f:
        yield f


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def checkpoint_keys(path: Path, config: MoondreamConfig) -> CheckpointKeys:
    """The file's layout and names, checked against `config` from its header alone (no tensor is read), so a
    checkpoint that does not fit fails before a model is built: its names, shapes and dtypes (an int8 file would
    otherwise fail halfway through the load)."""
    with open_safetensors(path) as f:
        slices = {k: f.get_slice(k) for k in f.keys()}
        shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
        dtypes = {k: s.get_dtype() for k, s in slices.items()}
    keys = match_layout(shapes, config, str(path))
    *others, last = SAFETENSORS_DTYPES.values()  # what TensorReader reads
    for name in keys.names.values():
        if dtypes[name] not in SAFETENSORS_DTYPES.values():
            raise CheckpointError(f"{path}: tensor {name!r} is stored as {dtypes[name]}; the loader reads "
                                  f"{', '.join(others)} or {last} weights (dequantize the checkpoint first)")
    return keys


class TensorReader:
    """The tensors of a safetensors file, read with plain reads rather than through a memory map: the file's pages
    then sit in the kernel's page cache instead of this process's resident memory (a memory map adds the whole
    file, 3.5 GiB for the real fp16 checkpoint, to the loading peak). Open it after `open_safetensors` has
    checked the file."""

    DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")
        (length,) = struct.unpack("<Q", self._file.read(8))
        self._entries = json.loads(self._file.read(length))
        self._base = 8 + length

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        start, end = entry["data_offsets"]
        dtype = self.DTYPES[entry["dtype"]]
        if end == start:
            return torch.empty(entry["shape"], dtype=dtype)
        buffer = bytearray(end - start)
        self._file.seek(self._base + start)
        self._file.readinto(buffer)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


def load_official_weights(model: torch.nn.Module, path: Path) -> CheckpointKeys:
    """Load a checkpoint in any accepted layout and dtype into a `MoondreamModel`, one tensor at a time: the
    peak is the model plus its largest tensor, never a second copy of the weights. Returns what was found."""
    keys = checkpoint_keys(path, model.config)
    _warn_region(keys, str(path))
    current = model.state_dict()
    with TensorReader(path) as f, torch.no_grad():
        for m in key_mappings(model.config):
            for key, tensor in zip(m.ours, m.to_ours(f.get_tensor(keys.names[m.official]))):
                current[key].copy_(tensor)
    return keys


def save_official_weights(model: torch.nn.Module, path: Path) -> None:
    """Write `model`'s weights in the official 2025 layout, in the dtype each tensor has, one tensor at a time."""
    state = model.state_dict()

    def official(m: KeyMapping) -> Callable[[], torch.Tensor]:
        return lambda: m.to_official([state[k].detach().cpu() for k in m.ours])

    write_safetensors(path, [(m.official, state[m.ours[0]].dtype, m.official_shape, official(m))
                             for m in key_mappings(model.config)], metadata={"format": "pt"})


Entry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def write_safetensors(path: Path, entries: list[Entry], metadata: dict[str, str]) -> None:
    """The safetensors format, written one tensor at a time: `safetensors.torch.save_file` first turns every
    tensor into a bytes object, a second copy of the whole model in memory (7 GiB for the real one in fp32),
    which is what ran a real-size `train --save-model` out of host memory. Each entry is (name, dtype, shape,
    a function making the tensor), so the header is written before any tensor exists. Atomic: readers see the
    old file or the new one."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, _make in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data that follows to 8 bytes
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, dtype, shape, make in entries:
            tensor = make().contiguous()
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, the header says "
                                 f"{dtype} {tuple(shape)}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


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
