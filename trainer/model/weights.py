"""Official Moondream2 weights ⇄ the transformers modules of `MoondreamModel`: the tensors themselves, read and
written one at a time, through the table and layouts of `layouts.py`. Checkpoints are read in every layout the
official loader accepts and in any float dtype, and always written in the 2025 layout.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from trainer.files import atomic_path
from trainer.model.config import MoondreamConfig
from trainer.model.layouts import WEIGHT_DTYPES, CheckpointKeys, KeyMapping, checkpoint_keys, key_mappings, \
    match_layout, read_header, warn_region

# torch's dtype for each safetensors dtype name the loader reads, and back
TORCH_DTYPES = {name: getattr(torch, attr) for name, attr in WEIGHT_DTYPES.items()}
SAFETENSORS_DTYPES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def to_ours(m: KeyMapping, tensor: torch.Tensor) -> list[torch.Tensor]:
    """The official tensor as the tensors of ours it holds (split along rows when fused)."""
    if len(m.ours) == 1:
        return [tensor.reshape(m.our_shapes[0])]
    return list(torch.split(tensor, [s[0] for s in m.our_shapes], dim=0))


def to_official(m: KeyMapping, tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors, dim=0).reshape(m.official_shape)


def official_to_ours(tensors: dict[str, torch.Tensor], config: MoondreamConfig, source: str) -> dict[str, torch.Tensor]:
    """Convert an official state dict in any accepted layout, checking every key and shape against `config`."""
    keys = match_layout({k: tuple(v.shape) for k, v in tensors.items()}, config, source)
    warn_region(keys, source)
    ours: dict[str, torch.Tensor] = {}
    for m in key_mappings(config):
        ours.update(zip(m.ours, to_ours(m, tensors[keys.names[m.official]])))
    return ours


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a file, whatever its dtype (a reference file holds token ids beside its weights)."""
    read_header(path)  # a missing or corrupt file is one line naming it
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


class TensorReader:
    """The tensors of a safetensors file, read with plain reads rather than through a memory map: the file's pages
    then sit in the kernel's page cache instead of this process's resident memory (a memory map adds the whole
    file, 3.5 GiB for the real fp16 checkpoint, to the loading peak). Open it after `checkpoint_keys` has
    checked the file."""

    def __init__(self, path: Path) -> None:
        header = read_header(path)
        self._entries, self._base = header.tensors, header.data_start
        self._file = open(path, "rb")

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        start, end = entry["data_offsets"]
        dtype = TORCH_DTYPES[entry["dtype"]]
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
    warn_region(keys, str(path))
    current = model.state_dict()
    with TensorReader(path) as f, torch.no_grad():
        for m in key_mappings(model.config):
            for key, tensor in zip(m.ours, to_ours(m, f.get_tensor(keys.names[m.official]))):
                current[key].copy_(tensor)
    return keys


def save_official_weights(model: torch.nn.Module, path: Path) -> None:
    """Write `model`'s weights in the official 2025 layout, in the dtype each tensor has, one tensor at a time."""
    state = model.state_dict()

    def official(m: KeyMapping) -> Callable[[], torch.Tensor]:
        return lambda: to_official(m, [state[k].detach().cpu() for k in m.ours])

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
