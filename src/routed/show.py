"""``routed show``: draw where a BiFormer's Bi-Level Routing Attention sent one query region.

The picture is the input image with the region grid of the chosen stage, the query region outlined
and the key regions it routed to shaded (:func:`routed.viz.draw_bra_routing`). Without ``--image``
an embedded default is drawn: a cluttered Fashion-MNIST scene when those files are installed
(``apt-get install dataset-fashion-mnist``), else a synthetic picture of a few shapes. Without
``--checkpoint`` the model has random weights (its routing then shows the mechanism, not a
learned choice).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

VARIANTS = {"tiny": ((2, 2, 8, 2), (64, 128, 256, 512)), "small": ((4, 4, 18, 4), (64, 128, 256, 512)),
            "base": ((4, 4, 18, 4), (96, 192, 384, 768))}
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def add_show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", default=None, help="an image file (default: an embedded scene)")
    p.add_argument("--size", type=int, default=224, help="the image is resized to size x size")
    p.add_argument("--variant", default="tiny", choices=sorted(VARIANTS))
    p.add_argument("--n-win", type=int, default=7, help="regions per side")
    p.add_argument("--checkpoint", default=None, help="a BiFormer state dict (.safetensors, .pt or .pth)")
    p.add_argument("--stage", type=int, default=2, choices=[1, 2, 3], help="routed stage to draw")
    p.add_argument("--block", type=int, default=-1, help="block of the stage (default: its last)")
    p.add_argument("--query", type=int, nargs=2, default=None, metavar=("ROW", "COL"),
                   help="query region (default: the centre region)")
    p.add_argument("--seed", type=int, default=0, help="random weights' seed (without --checkpoint)")
    p.add_argument("--out", default="routing.png")


def default_image(size: int) -> Tensor:
    """``[3, size, size]`` in [0, 1]: a cluttered Fashion-MNIST scene if the files are installed,
    else a few synthetic shapes on a noisy background."""
    try:
        from .data.images import SceneConfig, load_fashion_mnist, make_scene

        images, labels = load_fashion_mnist("test")
        scene = make_scene(images, labels, 0, seed=0, config=SceneConfig())
        img = torch.from_numpy(scene["image"]).float().div(255)[None, None]
    except (FileNotFoundError, OSError):
        g = torch.Generator().manual_seed(0)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
        img = 0.15 * torch.rand(size, size, generator=g)
        img = torch.maximum(img, ((yy - 0.3) ** 2 + (xx - 0.65) ** 2 < 0.012).float())  # a disc
        img = torch.maximum(img, ((yy - 0.72).abs() < 0.08) & ((xx - 0.3).abs() < 0.14)).float()  # a bar
        img = img[None, None]
    img = torch.nn.functional.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
    return img[0].expand(3, -1, -1).clamp(0, 1)


def load_image(path: str, size: int) -> Tensor:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size))
        return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1) / 255.0


def _load_state(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state.get("state_dict", state))


def run_show(args: argparse.Namespace) -> Path:
    """Draw the routing picture; returns its path."""
    from .models.biformer import BiFormer
    from .viz import draw_bra_routing

    image = load_image(args.image, args.size) if args.image else default_image(args.size)
    depths, dims = VARIANTS[args.variant]
    state: Optional[dict] = _load_state(args.checkpoint) if args.checkpoint else None
    num_classes = state["head.weight"].shape[0] if state is not None and "head.weight" in state else 1000
    torch.manual_seed(args.seed)
    model = BiFormer(depths=depths, embed_dims=dims, n_win=args.n_win, num_classes=num_classes).eval()
    if state is not None:
        model.load_state_dict(state)
    mean, std = torch.tensor(_MEAN).view(3, 1, 1), torch.tensor(_STD).view(3, 1, 1)
    with torch.no_grad():
        routings = model.routings(((image - mean) / std)[None])
    stage = routings[args.stage - 1]
    if not stage or stage[args.block] is None:
        raise ValueError(f"stage {args.stage} has no routed block {args.block}.")
    routing = stage[args.block]
    query = tuple(args.query) if args.query else (args.n_win // 2, args.n_win // 2)
    if not all(0 <= q < args.n_win for q in query):
        raise ValueError(f"--query {query} is outside the {args.n_win}x{args.n_win} region grid.")
    return draw_bra_routing(image, routing, query, args.out, stride=4 * 2 ** (args.stage - 1),
                            title=f"BiFormer-{args.variant[0].upper()} stage {args.stage}, query region {query}")
