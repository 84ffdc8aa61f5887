"""draw_bra_routing: a PNG whose shading covers exactly the routed regions."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from routed.viz import draw_bra_routing  # matplotlib comes with the dev and plot extras


def fake_routing(ids, S=4, region=(8, 8)):
    ids = torch.tensor(ids, dtype=torch.int64)
    return SimpleNamespace(region_ids=ids, region_hw=region, grid=S, padded_hw=(S * region[0], S * region[1]))


def orange_pixels(path) -> int:
    import matplotlib.image as mpimg

    rgb = mpimg.imread(path)[..., :3]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # tab:orange at alpha 0.45 over black: reddish-orange, clearly red > green > blue.
    return int(((r > 0.3) & (g > 0.15) & (g < 0.8 * r) & (b < 0.1)).sum())


def test_png_is_written_and_shading_grows_with_routed_regions(tmp_path):
    image = torch.zeros(1, 32, 32)   # black, so only the overlay has colour
    ids1 = [[[5] * 3 for _ in range(16)]]                  # query 0 -> region 5 (duplicates count once)
    ids3 = [[[5, 10, 15] for _ in range(16)]]              # query 0 -> three regions
    p1 = draw_bra_routing(image, fake_routing(ids1), 0, tmp_path / "one.png")
    p3 = draw_bra_routing(image, fake_routing(ids3), (0, 0), tmp_path / "sub" / "three.png")
    for p in (p1, p3):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    n1, n3 = orange_pixels(p1), orange_pixels(p3)
    assert n1 > 100
    assert 2.4 < n3 / n1 < 3.6, (n1, n3)


def test_stride_and_layouts(tmp_path):
    # A 3-channel HWC numpy image and a stride: regions of 2x2 tokens at stride 4 are 8x8 pixels.
    img = np.random.default_rng(0).random((32, 32, 3))
    r = fake_routing([[[1, 2], [0, 3], [0, 1], [2, 3]]], S=2, region=(4, 4))
    p = draw_bra_routing(img, r, 3, tmp_path / "s.png", stride=4, title="t")
    assert p.exists() and p.stat().st_size > 1000


def test_bad_arguments(tmp_path):
    r = fake_routing([[[0]] * 16])
    with pytest.raises(ValueError, match="outside the 4x4 grid"):
        draw_bra_routing(torch.zeros(32, 32), r, 16, tmp_path / "x.png")
    with pytest.raises(ValueError, match="outside the 4x4 grid"):
        draw_bra_routing(torch.zeros(32, 32), r, (4, 0), tmp_path / "x.png")
    with pytest.raises(ValueError, match="batch_index"):
        draw_bra_routing(torch.zeros(32, 32), r, 0, tmp_path / "x.png", batch_index=1)
    with pytest.raises(ValueError, match="image must be"):
        draw_bra_routing(torch.zeros(2, 5, 32, 32), r, 0, tmp_path / "x.png")
    with pytest.raises(ValueError, match="region_ids must be"):
        draw_bra_routing(torch.zeros(32, 32), fake_routing([[[0]] * 9]), 0, tmp_path / "x.png")


def test_draws_a_real_block_routing(tmp_path):
    from routed.models import BRABlock

    torch.manual_seed(0)
    blk = BRABlock(16, num_heads=2, n_win=3, topk=2).eval()
    x = torch.randn(1, 16, 14, 14)
    with torch.no_grad():
        _, routing = blk(x, return_routing=True)
    # Drawn over a black picture of the map's size, so the shading is the only colour.
    p = draw_bra_routing(torch.zeros(14, 14), routing, 4, tmp_path / "real.png")
    assert orange_pixels(p) > 0
