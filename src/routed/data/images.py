"""Fashion-MNIST and cluttered Fashion-MNIST scenes: real images for vision routing experiments.

Fashion-MNIST (MIT licence) installs offline as a Debian package::

    apt-get install dataset-fashion-mnist     # -> /usr/share/datasets/fashion-mnist/*-ubyte.gz

or point ``ROUTED_FASHION_MNIST`` at any folder holding the four idx files
(``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``).

A cluttered scene (the "cluttered MNIST" construction) puts one target item, possibly scaled up,
at a random position on a larger black canvas among clutter patches cut from other items; its
label is the target's class. Content-based routing should find the item; static windows cannot
know where it is. Scenes are a pure function of ``(seed, scene index)``.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["FASHION_MNIST_CLASSES", "ENV_VAR", "DEFAULT_DIR", "fashion_mnist_dir", "read_idx", "write_idx",
           "load_fashion_mnist", "SceneConfig", "make_scene", "make_scenes", "ClutteredScenes",
           "cluttered_fashion_mnist"]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
ENV_VAR = "ROUTED_FASHION_MNIST"
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_SPLITS = {"train": "train", "test": "t10k", "t10k": "t10k"}
# idx type codes -> numpy dtypes (big-endian as the format stores them).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def fashion_mnist_dir(root: Union[str, os.PathLike, None] = None) -> Path:
    """The folder to read Fashion-MNIST from: ``root``, else ``$ROUTED_FASHION_MNIST``, else the
    Debian package's ``/usr/share/datasets/fashion-mnist``."""
    return Path(root or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an idx file (the MNIST format; gzipped when the name ends in ``.gz``) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {data[:4].hex()}); expected the "
                         "Fashion-MNIST/MNIST format, e.g. train-images-idx3-ubyte.gz.")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims)) if dims else 0
    offset = 4 + 4 * ndim
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"{path} is truncated: header says {dims} of {dtype}, the file holds "
                         f"{len(data) - offset} bytes of data.")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: Union[str, os.PathLike], array: np.ndarray) -> None:
    """Write ``array`` (uint8, or int32 and the other idx types) as an idx file, gzipped if the name
    ends in ``.gz``. The inverse of :func:`read_idx`; tests build fake datasets with it."""
    path = Path(path)
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("=").str: k for k, v in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("=").str)
    if code is None:
        raise ValueError(f"idx files cannot hold {array.dtype}; use uint8, int8, int16, int32, float32 or float64.")
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    body = array.astype(np.dtype(_IDX_DTYPES[code])).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + body)


def _find(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist(split: str = "train", root: Union[str, os.PathLike, None] = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` (``"train"``: 60000 items, ``"test"``: 10000) from :func:`fashion_mnist_dir`.

    Returns ``(images uint8 [N, 28, 28], labels int64 [N])``; class names in ``FASHION_MNIST_CLASSES``.
    Raises ``FileNotFoundError`` saying how to get the files when they are missing.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    folder = fashion_mnist_dir(root)
    prefix = _SPLITS[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find(folder, s) for s in stems]
    missing = [s + "[.gz]" for s, p in zip(stems, paths) if p is None]
    if missing:
        where = "given root" if root else (f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "default folder")
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files not found in {folder} (the {where}): missing {', '.join(missing)}. "
            f"Get them with `apt-get install dataset-fashion-mnist` (installs {DEFAULT_DIR}), or set "
            f"{ENV_VAR}=/path/to/folder holding the four idx files "
            "({train,t10k}-{images-idx3,labels-idx1}-ubyte.gz).")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split} files in {folder} disagree: images {images.shape}, "
                         f"labels {labels.shape}; expected [N, 28, 28] and [N].")
    return images.astype(np.uint8), labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneConfig:
    """How a cluttered scene is built.

    canvas: side of the square canvas in pixels.
    scale: the target is resized by a factor drawn uniformly from ``[scale[0], scale[1]]`` (28 px -> 28*s).
    clutter: number of clutter patches.
    clutter_size: side of each square clutter patch, cut at a random place of a random other item.
    """

    canvas: int = 128
    scale: tuple[float, float] = (1.0, 1.5)
    clutter: int = 12
    clutter_size: int = 12

    def __post_init__(self):
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {self.scale}.")
        if round(28 * hi) > self.canvas:
            raise ValueError(f"a target scaled by {hi} ({round(28 * hi)} px) does not fit a {self.canvas} px canvas.")
        if not 0 < self.clutter_size <= 28 or self.clutter < 0:
            raise ValueError(f"need clutter >= 0 and 0 < clutter_size <= 28, got {self.clutter}, {self.clutter_size}.")


def _resize(item: np.ndarray, size: int) -> np.ndarray:
    if size == item.shape[0]:
        return item
    t = torch.from_numpy(item.astype(np.float32))[None, None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def make_scene(images: np.ndarray, labels: np.ndarray, index: int, seed: int = 0,
               config: SceneConfig = SceneConfig()) -> dict:
    """Scene number ``index`` of the stream defined by ``seed`` (a pure function of both).

    Args:
        images: source items, uint8 ``[N, 28, 28]``; labels: ``[N]``.

    Returns a dict: ``image`` uint8 ``[canvas, canvas]``, ``label`` (the target's class), ``box``
    ``(top, left, height, width)`` of the pasted target, ``source`` (the target's index in ``images``).
    Clutter is pasted first and the target last, both with a pixel-wise max, so the whole target is
    visible where the box says.
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"images must be [N, 28, 28], got {images.shape}.")
    n, c = len(images), config.canvas
    if n < 2 and config.clutter:
        raise ValueError("clutter needs at least two source items (it is cut from items other than the target).")
    rng = np.random.default_rng([seed, index])
    src = int(rng.integers(n))
    canvas = np.zeros((c, c), dtype=np.uint8)
    cs = config.clutter_size
    for _ in range(config.clutter):
        other = int(rng.integers(n - 1))
        other += other >= src   # any item but the target
        oy, ox = rng.integers(0, 28 - cs + 1, size=2)
        py, px = rng.integers(0, c - cs + 1, size=2)
        patch = images[other, oy:oy + cs, ox:ox + cs]
        np.maximum(canvas[py:py + cs, px:px + cs], patch, out=canvas[py:py + cs, px:px + cs])
    size = int(round(28 * rng.uniform(*config.scale)))
    item = _resize(images[src], size)
    top, left = (int(v) for v in rng.integers(0, c - size + 1, size=2))
    np.maximum(canvas[top:top + size, left:left + size], item, out=canvas[top:top + size, left:left + size])
    return {"image": canvas, "label": int(labels[src]), "box": (top, left, size, size), "source": src}


def make_scenes(images: np.ndarray, labels: np.ndarray, n: int, seed: int = 0,
                config: SceneConfig = SceneConfig(), start: int = 0) -> dict[str, np.ndarray]:
    """Scenes ``start .. start+n-1`` of stream ``seed``, stacked: ``images`` uint8 ``[n, canvas, canvas]``,
    ``labels`` int64 ``[n]``, ``boxes`` int64 ``[n, 4]`` (top, left, height, width), ``sources`` int64 ``[n]``."""
    scenes = [make_scene(images, labels, start + i, seed, config) for i in range(n)]
    c = config.canvas
    return {
        "images": np.stack([s["image"] for s in scenes]) if scenes else np.zeros((0, c, c), np.uint8),
        "labels": np.array([s["label"] for s in scenes], dtype=np.int64),
        "boxes": np.array([s["box"] for s in scenes], dtype=np.int64).reshape(-1, 4),
        "sources": np.array([s["source"] for s in scenes], dtype=np.int64),
    }


class ClutteredScenes(torch.utils.data.Dataset):
    """``n`` cluttered scenes of stream ``seed``, made on demand: item ``i`` is
    ``(image float32 [1, canvas, canvas] in [0, 1], label int)``, the same on every access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, n: int, seed: int = 0,
                 config: SceneConfig = SceneConfig()):
        self.images, self.labels = np.asarray(images), np.asarray(labels)
        self.n, self.seed, self.config = n, seed, config

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int) -> dict:
        """The full scene record of item ``i`` (see :func:`make_scene`)."""
        if not 0 <= i < self.n:
            raise IndexError(f"scene {i} out of range for {self.n} scenes.")
        return make_scene(self.images, self.labels, i, self.seed, self.config)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.scene(i)
        return torch.from_numpy(s["image"]).float().div_(255.0)[None], s["label"]


def cluttered_fashion_mnist(split: str = "train", n: int = 10000, seed: int = 0, config: SceneConfig = SceneConfig(),
                            root: Union[str, os.PathLike, None] = None) -> ClutteredScenes:
    """Cluttered scenes built from Fashion-MNIST ``split`` (targets and clutter both from that split,
    so train and test scenes share no item)."""
    images, labels = load_fashion_mnist(split, root)
    return ClutteredScenes(images, labels, n, seed, config)
