import pytest
import torch
from PIL import Image

from trainer.model.config import PRESETS
from trainer.model.image_crops import make_crops, select_tiling, stitch_local_features


@pytest.mark.parametrize("height,width", [(50, 200), (760, 1000), (3000, 400), (400, 3000), (2000, 2000)])
def test_tiling_stays_within_the_crop_budget(height, width):
    rows, cols = select_tiling(height, width, 266, 12)
    assert 1 <= rows * cols <= 12


def test_small_images_get_one_tile_and_the_global_crop():
    crops = make_crops(Image.new("RGB", (200, 50), "white"), PRESETS["moondream2"].vision)
    assert crops.tiling == (1, 1) and crops.pixels.shape == (2, 378, 378, 3)


@pytest.mark.parametrize("tiling", [(1, 1), (2, 3), (3, 4)])
def test_stitching_covers_the_image_exactly_once(tiling):
    """Tiles cut with a margin, each holding its own global coordinates, stitch back to the full grid."""
    grid, margin = 27, 4
    step = grid - 2 * margin
    rows, cols = tiling
    height, width = rows * step + 2 * margin, cols * step + 2 * margin
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    full = torch.stack([ys, xs], -1).float()
    tiles = torch.stack([full[r * step: r * step + grid, c * step: c * step + grid]
                         for r in range(rows) for c in range(cols)])
    assert torch.equal(stitch_local_features(tiles, tiling, margin), full)
