"""Model sizes: the real Moondream2 and small configurations for tests and CPU demos.

Field names follow the official Moondream2 config (`enc_dim`, `dim`, ...) so a
reference file or an official config maps onto these classes without a rename table.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from transformers import PhiConfig, SiglipVisionConfig

CONFIG_FILE = "mdsweep_config.json"
WEIGHTS_FILE = "model.safetensors"
# Pretrained bases that ship with the project (`models/NAME/`), loaded by name like a preset
# but through the official-layout path, exactly as a downloaded Moondream2 checkpoint.
SHIPPED_MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


@dataclass(frozen=True)
class VisionConfig:
    enc_dim: int = 1152
    enc_patch_size: int = 14
    enc_n_layers: int = 27
    enc_ff_dim: int = 4304
    enc_n_heads: int = 16
    proj_out_dim: int = 2048
    proj_inner_dim: int = 8192
    crop_size: int = 378
    in_channels: int = 3
    max_crops: int = 12
    overlap_margin: int = 4

    @property
    def grid(self) -> int:
        """Patches per crop side; local features are pooled to this grid (27 for the real model)."""
        return self.crop_size // self.enc_patch_size

    @property
    def n_image_tokens(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class TextConfig:
    dim: int = 2048
    ff_dim: int = 8192
    n_layers: int = 24
    n_heads: int = 32
    n_kv_heads: int = 32
    vocab_size: int = 51200
    max_context: int = 2048


@dataclass(frozen=True)
class MoondreamConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # "bpe": tokenizer.json from the model directory; "char": the built-in character tokenizer
    tokenizer: str = "bpe"

    def siglip_config(self, attn_implementation: str) -> SiglipVisionConfig:
        from transformers import SiglipVisionConfig  # here, so sizes can be read without loading torch

        v = self.vision
        return SiglipVisionConfig(
            hidden_size=v.enc_dim,
            intermediate_size=v.enc_ff_dim,
            num_hidden_layers=v.enc_n_layers,
            num_attention_heads=v.enc_n_heads,
            num_channels=v.in_channels,
            image_size=v.crop_size,
            patch_size=v.enc_patch_size,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-5,
            attention_dropout=0.0,
            vision_use_head=False,
            attn_implementation=attn_implementation,
        )

    def phi_config(self, attn_implementation: str) -> PhiConfig:
        from transformers import PhiConfig

        t = self.text
        return PhiConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.dim,
            intermediate_size=t.ff_dim,
            num_hidden_layers=t.n_layers,
            num_attention_heads=t.n_heads,
            num_key_value_heads=t.n_kv_heads,
            max_position_embeddings=t.max_context,
            partial_rotary_factor=0.5,
            rope_theta=10000.0,
            hidden_act="gelu_pytorch_tanh",  # gelu_new in one fused kernel: saves 2 tensors for backward, not 5
            layer_norm_eps=1e-5,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            use_cache=False,
            attn_implementation=attn_implementation,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> "MoondreamConfig":
        """Accepts our own saved config and the official `{vision: {...}, text: {...}}` layout.

        Official fields we do not model (e.g. `prefix_attn`, which follows from the crop
        grid) are ignored. Sizes that cannot build a model (zero heads, a width the heads do not divide, text
        where a number belongs) raise ValueError naming the field: they would otherwise surface as a division
        by zero or a shape error deep in the network.
        """
        if not isinstance(values, dict):
            raise ValueError(f"a JSON {_json_kind(values)}, not an object of sizes")

        def pick(kind: type, section: str) -> Any:
            raw = values.get(section, {})
            if not isinstance(raw, dict):
                raise ValueError(f"{section} must be an object of sizes, got a JSON {_json_kind(raw)}")
            names = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: v for k, v in raw.items() if k in names})

        config = cls(vision=pick(VisionConfig, "vision"), text=pick(TextConfig, "text"),
                     tokenizer=values.get("tokenizer", "bpe"))
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return config

    def problems(self) -> list[str]:
        """Every size that cannot build a model, each naming its field (`text.n_heads`)."""
        found = [*_size_problems("vision", self.vision), *_size_problems("text", self.text)]
        if found:  # the ratios below need whole, positive sizes
            return found
        v, t = self.vision, self.text
        for width, heads, w, h in (("vision.enc_dim", "vision.enc_n_heads", v.enc_dim, v.enc_n_heads),
                                   ("text.dim", "text.n_heads", t.dim, t.n_heads),
                                   ("text.n_heads", "text.n_kv_heads", t.n_heads, t.n_kv_heads)):
            if w % h:
                found.append(f"{width} {w} must be a multiple of {heads} {h}")
        if v.crop_size < v.enc_patch_size:
            found.append(f"vision.crop_size {v.crop_size} must be at least vision.enc_patch_size {v.enc_patch_size}")
        if self.tokenizer not in ("bpe", "char"):
            found.append(f"tokenizer must be bpe or char, got {self.tokenizer!r}")
        return found

    def save(self, directory: Path) -> None:
        (Path(directory) / CONFIG_FILE).write_text(json.dumps(self.to_dict(), indent=1))


def _json_kind(value: Any) -> str:
    """What a parsed JSON value is, in the words a user reads (a list, where JSON says array)."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _size_problems(section: str, sizes: Any) -> list[str]:
    """Each size of one section must be a whole number, at least 1 (0 allowed for the crop overlap)."""
    found = []
    for f in dataclasses.fields(sizes):
        value, least = getattr(sizes, f.name), 0 if f.name == "overlap_margin" else 1
        if not isinstance(value, int) or isinstance(value, bool):
            found.append(f"{section}.{f.name} must be a whole number, got {value!r}")
        elif value < least:
            found.append(f"{section}.{f.name} must be ≥ {least}, got {value}")
    return found


# `tiny` trains at several steps/s on 2 CPU cores and is the from-scratch learning demo
# (bench/demo_learning.py); `small` is a wider/deeper CPU size; `moondream2` is the real
# 1.87 B model.
PRESETS: dict[str, MoondreamConfig] = {
    "moondream2": MoondreamConfig(),
    "tiny": MoondreamConfig(
        vision=VisionConfig(enc_dim=64, enc_patch_size=14, enc_n_layers=2, enc_ff_dim=128, enc_n_heads=2,
                            proj_out_dim=96, proj_inner_dim=128, crop_size=112, max_crops=4, overlap_margin=1),
        text=TextConfig(dim=96, ff_dim=192, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=128, max_context=256),
        tokenizer="char",
    ),
    "small": MoondreamConfig(
        vision=VisionConfig(enc_dim=128, enc_patch_size=14, enc_n_layers=4, enc_ff_dim=256, enc_n_heads=4,
                            proj_out_dim=128, proj_inner_dim=256, crop_size=112, max_crops=4, overlap_margin=1),
        text=TextConfig(dim=128, ff_dim=256, n_layers=3, n_heads=4, n_kv_heads=4, vocab_size=128, max_context=256),
        tokenizer="char",
    ),
}


def shipped_models() -> list[str]:
    if not SHIPPED_MODELS_DIR.is_dir():
        return []
    return sorted(d.name for d in SHIPPED_MODELS_DIR.iterdir() if (d / WEIGHTS_FILE).is_file())


def model_config_of(spec: str) -> MoondreamConfig:
    """The sizes a model spec will load with, read without loading weights: a preset, a shipped model or
    a local directory with its config; anything else (a hub id, an official directory) is Moondream2."""
    if spec in PRESETS:
        return PRESETS[spec]
    directory = SHIPPED_MODELS_DIR / spec if spec in shipped_models() else Path(spec).expanduser()
    saved = read_saved_config(directory)
    return MoondreamConfig.from_dict(saved) if saved is not None else PRESETS["moondream2"]


def read_saved_config(directory: Path) -> Optional[dict[str, Any]]:
    """`directory`'s CONFIG_FILE as saved (sizes, and what loading.py keeps beside them), its sizes checked;
    None when there is none. A file that is not JSON, not an object or holds sizes no model can have is a
    ValueError naming the file, so that a user knows which file to mend."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{path}: not JSON ({e})") from None
    try:
        MoondreamConfig.from_dict(values)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return values
