"""Fashion-MNIST loading and cluttered scenes, on synthetic idx files (CI has no Fashion-MNIST)."""

import gzip

import numpy as np
import pytest
import torch

from routed.data.images import (ENV_VAR, ClutteredScenes, SceneConfig, cluttered_fashion_mnist, load_fashion_mnist,
                                make_scene, make_scenes, read_idx, write_idx)


def fake_items(n: int = 30, seed: int = 0):
    """Items that are easy to tell apart: random bright blobs on black, one class per item mod 10."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for i in range(n):
        y0, x0 = rng.integers(2, 10, size=2)
        images[i, y0:y0 + 16, x0:x0 + 14] = rng.integers(40, 256, size=(16, 14), dtype=np.uint8)
    return images, (np.arange(n) % 10).astype(np.int64)


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    """A folder with the four Fashion-MNIST idx files (train gzipped, test not), named by the env var."""
    tr_x, tr_y = fake_items(30, seed=1)
    te_x, te_y = fake_items(12, seed=2)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", tr_x)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", tr_y.astype(np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", te_x)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", te_y.astype(np.uint8))
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    return tmp_path, (tr_x, tr_y), (te_x, te_y)


def test_load_from_env_folder(fake_root):
    _, (tr_x, tr_y), (te_x, te_y) = fake_root
    x, y = load_fashion_mnist("train")
    assert x.dtype == np.uint8 and x.shape == (30, 28, 28) and y.dtype == np.int64
    np.testing.assert_array_equal(x, tr_x)
    np.testing.assert_array_equal(y, tr_y)
    x, y = load_fashion_mnist("test")   # uncompressed files work too
    np.testing.assert_array_equal(x, te_x)
    np.testing.assert_array_equal(y, te_y)


def test_idx_roundtrip_and_header(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4) - 5
    write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)
    with gzip.open(tmp_path / "a.gz", "rb") as f:
        head = f.read(8)
    assert head[:4] == bytes([0, 0, 0x0C, 3]) and int.from_bytes(head[4:8], "big") == 2
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


def test_missing_files_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as e:
        load_fashion_mnist("train")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and ENV_VAR in msg
    assert "nowhere" in msg and "train-images-idx3-ubyte" in msg
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)


def _resized(item: np.ndarray, size: int) -> np.ndarray:
    from routed.data.images import _resize
    return _resize(item, size)


def test_target_is_where_the_box_says_without_clutter():
    x, y = fake_items()
    cfg = SceneConfig(canvas=64, scale=(1.0, 1.6), clutter=0)
    for i in range(20):
        s = make_scene(x, y, i, seed=3, config=cfg)
        top, left, h, w = s["box"]
        assert h == w and 28 <= h <= round(28 * 1.6)
        assert 0 <= top <= 64 - h and 0 <= left <= 64 - w
        img = s["image"].copy()
        np.testing.assert_array_equal(img[top:top + h, left:left + w], _resized(x[s["source"]], h))
        img[top:top + h, left:left + w] = 0
        assert img.max() == 0   # nothing outside the box
        assert s["label"] == y[s["source"]]


def test_clutter_keeps_the_target_whole_and_adds_patches():
    x, y = fake_items()
    cfg = SceneConfig(canvas=96, scale=(1.0, 1.0), clutter=10, clutter_size=8)
    s = make_scene(x, y, 5, seed=0, config=cfg)
    top, left, h, w = s["box"]
    crop = s["image"][top:top + h, left:left + w]
    assert (crop >= x[s["source"]]).all()
    outside = s["image"].copy()
    outside[top:top + h, left:left + w] = 0
    assert outside.max() > 0   # clutter lands outside the target too
    # With one source item there is nothing to cut clutter from.
    with pytest.raises(ValueError, match="at least two"):
        make_scene(x[:1], y[:1], 0, config=cfg)


def test_scenes_are_deterministic_per_seed_and_index():
    x, y = fake_items()
    cfg = SceneConfig(canvas=64)
    a = make_scenes(x, y, 6, seed=7, config=cfg)
    b = make_scenes(x, y, 6, seed=7, config=cfg)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = make_scenes(x, y, 6, seed=8, config=cfg)
    assert not np.array_equal(a["images"], c["images"])
    # Scene i does not depend on how many scenes are made or where the batch starts.
    tail = make_scenes(x, y, 3, seed=7, config=cfg, start=3)
    np.testing.assert_array_equal(tail["images"], a["images"][3:])
    np.testing.assert_array_equal(a["labels"], y[a["sources"]])
    assert a["boxes"].shape == (6, 4) and a["images"].shape == (6, 64, 64)


def test_dataset_items(fake_root):
    ds = cluttered_fashion_mnist("test", n=5, seed=1, config=SceneConfig(canvas=64))
    assert len(ds) == 5
    img, label = ds[2]
    assert img.shape == (1, 64, 64) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0 and float(img.max()) > 0
    s = ds.scene(2)
    assert label == s["label"] == ds.labels[s["source"]]
    torch.testing.assert_close(img[0], torch.from_numpy(s["image"]).float() / 255)
    with pytest.raises(IndexError):
        ds[5]
    assert isinstance(ds, ClutteredScenes)


def test_scene_config_validation():
    with pytest.raises(ValueError, match="does not fit"):
        SceneConfig(canvas=32, scale=(1.0, 2.0))
    with pytest.raises(ValueError, match="scale"):
        SceneConfig(scale=(1.5, 1.0))
    with pytest.raises(ValueError, match="clutter_size"):
        SceneConfig(clutter_size=40)
