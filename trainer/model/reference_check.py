"""Check this implementation against a reference produced by the official Moondream2 code.

    python -m trainer.model.reference_check DIR

reads `DIR/moondream2_tiny_ref.json` and `.safetensors`, recomputes every
`expected.*` tensor (crops, image embeddings, prefix-layout logits) and prints the
largest absolute error of each. Exit status 0 only when all are within tolerance.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.model.config import MoondreamConfig
from trainer.model.image_crops import make_crops, normalize
from trainer.model.network import MoondreamModel
from trainer.model.weights import load_official_weights, read_safetensors

REFERENCE_NAME = "moondream2_tiny_ref"


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> tuple[bool, str]:
    if actual.shape != expected.shape:
        return False, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    error = (actual - expected).abs()
    ok = bool((error <= atol + rtol * expected.abs()).all())
    return ok, f"{name}: max abs error {error.max().item():.3e} {'ok' if ok else 'FAIL'}"


def check(directory: Path) -> tuple[bool, list[str]]:
    spec = json.loads((directory / f"{REFERENCE_NAME}.json").read_text())
    tensors = read_safetensors(directory / f"{REFERENCE_NAME}.safetensors")
    atol, rtol = spec["tolerance"]["atol"], spec["tolerance"]["rtol"]
    config = MoondreamConfig.from_dict(spec)
    bos_id = spec["text_input"]["bos_id"]
    model = MoondreamModel(config, bos_id=bos_id).eval()
    load_official_weights(model, directory / f"{REFERENCE_NAME}.safetensors")

    results: list[tuple[bool, str]] = []
    checked: set[str] = set()

    def check_tensor(key: str, actual: torch.Tensor, tol: tuple[float, float]) -> None:
        checked.add(key)
        results.append(compare(key, actual, tensors[key], *tol))

    embeddings: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for image_name, image_spec in spec["images"].items():
            crops = make_crops(Image.open(directory / image_spec["file"]), config.vision)
            expected_tiling = tuple(image_spec["tiling"])
            results.append((crops.tiling == expected_tiling,
                            f"tiling.{image_name}: {crops.tiling} vs expected {expected_tiling}"))
            key = f"expected.crops_uint8.{image_name}"
            if key in tensors:
                check_tensor(key, torch.from_numpy(crops.pixels.astype(np.int64)), (0, 0))
            embeddings[image_name] = model.encode_images(normalize(crops.pixels), [crops.tiling])[0]
            key = f"expected.image_embeddings.{image_name}"
            if key in tensors:
                check_tensor(key, embeddings[image_name], (atol, rtol))
        text = spec["text_input"]
        for key in sorted(k for k in tensors if k.startswith("expected.logits_prefix.")):
            image_name = key.removeprefix("expected.logits_prefix.")
            ids = torch.tensor([text["token_ids"]])
            logits = model.text_logits(embeddings[image_name][None], ids, "prefix")[0]
            check_tensor(key, logits, (atol, rtol))
    unchecked = sorted(k for k in tensors if k.startswith("expected.") and k not in checked)
    results += [(False, f"{k}: not checked (unknown kind)") for k in unchecked]
    return all(ok for ok, _ in results), [line for _, line in results]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help=f"folder holding {REFERENCE_NAME}.json and .safetensors")
    args = parser.parse_args(argv)
    ok, lines = check(args.directory)
    print("\n".join(lines))
    print("reference check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
