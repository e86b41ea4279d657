"""The official Moondream2 checkpoint's tensor names and shapes, the layouts they come in, and a file's header
checked against them: all from names, shapes and dtypes, without torch.

The official checkpoint fuses q, k and v into one `qkv` matrix and stores the patch embedding as a linear layer
over (channel, row, column)-flattened patches; SigLIP and Phi keep them apart and use a convolution. The table of
`key_mappings` (in the 2025 names) is the single source of truth for both directions of `weights.py`. Checkpoints
are read in every layout the official loader accepts (the 2024 names of the revisions users pin for captcha
fine-tuning, the 2025 names with or without `model.`, `torch.compile`'s `._orig_mod` infixes, any float dtype).

Kept apart from the tensors so that a sweep's driver checks a model before Ray starts without loading torch,
which costs seconds of every `mdsweep run`.
"""
from __future__ import annotations

import json
import math
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from trainer.model.config import MoondreamConfig


# The safetensors format's dtypes and their widths in bytes, by their names in a file's header.
FORMAT_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
# Those model weights are read in, with torch's name for each.
WEIGHT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# The largest header the safetensors library reads: a larger one is a corrupt length, not a checkpoint.
MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the file and key."""


@dataclass(frozen=True)
class KeyMapping:
    """One official tensor and the tensors of ours it holds: several when the official one is fused (qkv)."""

    official: str
    ours: tuple[str, ...]
    official_shape: tuple[int, ...]
    our_shapes: tuple[tuple[int, ...], ...]


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


def warn_region(keys: CheckpointKeys, source: str) -> None:
    """Say once that a checkpoint's object-detection head is left out, rather than dropping it silently."""
    if keys.region:
        warnings.warn(f"{source}: ignoring {keys.region} region-head tensors ({keys.layout.region_prefix}*), "
                      "which this project does not train", stacklevel=3)


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, dict[str, Any]]  # name -> dtype, shape, data_offsets (from data_start)
    data_start: int  # where the tensors' bytes begin in the file


def read_header(path: Path) -> SafetensorsHeader:
    """A safetensors file's tensor entries, read with plain reads: the format is an 8-byte length, a JSON header
    (UTF-8) and the data, which the tensors' byte ranges tile exactly. Whatever breaks that (a short or cut file,
    a header too long or no JSON object, a malformed entry, overlapping or uncovered bytes) is one CheckpointError
    naming the file and what is wrong, as the safetensors library's own checks would refuse it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{size} bytes, shorter than the format's 8-byte header length")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"its header length {length} is over the format's limit of {MAX_HEADER_BYTES} bytes")
            if length > size - 8:
                raise ValueError(f"its header length {length} runs past the end of the file ({size} bytes)")
            header = json.loads(f.read(length).decode("utf-8"))
        tensors = _tensor_entries(header, size - 8 - length)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, ValueError, RecursionError) as exc:  # json's and UnicodeDecodeError are ValueErrors
        reason = "its header nests too deep" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason})") from None
    return SafetensorsHeader(tensors, 8 + length)


def _tensor_entries(header: Any, data_bytes: int) -> dict[str, dict[str, Any]]:
    """The header's tensor entries, each checked, and their byte ranges tiling the `data_bytes` after it."""
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError("its __metadata__ is not a map of strings")
    for name, entry in header.items():
        _check_entry(name, entry)
    at = 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        start, end = entry["data_offsets"]
        if start != at:
            raise ValueError(f"tensor {name!r} starts at byte {start} of the data, where the tensor before it ends "
                             f"at byte {at}: {'overlapping' if start < at else 'uncovered'} bytes")
        at = end
    if at != data_bytes:
        raise ValueError(f"the tensors' data is {at} bytes, the file holds {data_bytes} after its header"
                         + (" (the file is cut short)" if at > data_bytes else ""))
    return header


def _check_entry(name: str, entry: Any) -> None:
    """One header entry: a dtype of the format, a shape of whole numbers, and [start, end] offsets whose span is
    the shape's size in that dtype."""
    if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= set(entry)):
        raise ValueError(f"tensor {name!r}: its header entry needs a dtype, a shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not (isinstance(dtype, str) and dtype in FORMAT_DTYPE_BYTES):
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of whole numbers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} is not [start, end] with 0 <= start <= end")
    if offsets[1] - offsets[0] != math.prod(shape) * FORMAT_DTYPE_BYTES[dtype]:
        raise ValueError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for a {dtype} tensor of shape "
                         f"{tuple(shape)}")


def checkpoint_keys(path: Path, config: MoondreamConfig) -> CheckpointKeys:
    """The file's layout and names, checked against `config` from its header alone (no tensor is read), so a
    checkpoint that does not fit fails before a model is built: its names, shapes and dtypes (an int8 file would
    otherwise fail halfway through the load)."""
    header = read_header(path).tensors
    keys = match_layout({k: tuple(entry["shape"]) for k, entry in header.items()}, config, str(path))
    *others, last = WEIGHT_DTYPES
    for name in keys.names.values():
        if header[name]["dtype"] not in WEIGHT_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} is stored as {header[name]['dtype']}; the loader reads "
                                  f"{', '.join(others)} or {last} weights (dequantize the checkpoint first)")
    return keys
