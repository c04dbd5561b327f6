"""Shared helpers for the data tests: tiny datasets written in the real on-disk formats.

The layouts are torchvision's (CIFAR python pickles and binary records, STL-10 column-major
binaries) and Broden's (written by cnnexplain's own exporter). Import with
``from data_fixtures import ...`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnexplain.data.synthetic import WorldConfig

TINY_BRODEN = WorldConfig(
    num_images=24, resolution=32, seed=3, second_object=0.5, clever_hans=("star", 0.5)
)


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machine's cores are shared: keep torch on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def broden_export(tmp_path_factory):
    """(export result, root) of a 24-image, 32 px synthetic Broden export (read-only: copy it
    with :func:`copy_tree` before changing anything)."""
    from cnnexplain.data.broden import export_broden

    root = tmp_path_factory.mktemp("broden") / "tiny"
    return export_broden(TINY_BRODEN, root), root


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def images_uint8(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Random uint8 images [n, 3, h, w]."""
    return np.random.default_rng(seed).integers(0, 256, (n, 3, h, w), dtype=np.uint8)


def write_pickle(path: Path, obj, protocol: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10_python(
    root: Path, per_batch: int = 4, n_test: int = 6, protocol: int = 2
) -> dict:
    """cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta with bytes keys (as the
    original Python 2 pickles load with encoding='bytes'); returns the arrays written."""
    d = root / "cifar-10-batches-py"
    names = [f"class{k}" for k in range(10)]
    train_x, train_y = [], []
    for b in range(1, 6):
        x = images_uint8(per_batch, 32, 32, seed=b)
        y = [(b * 7 + j) % 10 for j in range(per_batch)]
        write_pickle(
            d / f"data_batch_{b}",
            {b"batch_label": b"training batch", b"data": x.reshape(per_batch, -1), b"labels": y},
            protocol,
        )
        train_x.append(x)
        train_y += y
    tx = images_uint8(n_test, 32, 32, seed=99)
    ty = [j % 10 for j in range(n_test)]
    write_pickle(d / "test_batch", {b"data": tx.reshape(n_test, -1), b"labels": ty}, protocol)
    write_pickle(d / "batches.meta", {b"label_names": [n.encode() for n in names]}, protocol)
    return {
        "train_x": np.concatenate(train_x),
        "train_y": np.array(train_y),
        "test_x": tx,
        "test_y": np.array(ty),
        "names": names,
    }


def write_cifar100_python(
    root: Path, n_train: int = 12, n_test: int = 5, protocol: int = 4
) -> dict:
    """cifar-100-python/train, test, meta (str keys, fine and coarse labels)."""
    d = root / "cifar-100-python"
    x, tx = images_uint8(n_train, 32, 32, 5), images_uint8(n_test, 32, 32, 6)
    y, ty = [(3 * j) % 100 for j in range(n_train)], [(7 * j) % 100 for j in range(n_test)]
    write_pickle(
        d / "train",
        {"data": x.reshape(n_train, -1), "fine_labels": y, "coarse_labels": [v // 5 for v in y]},
        protocol,
    )
    write_pickle(
        d / "test",
        {"data": tx.reshape(n_test, -1), "fine_labels": ty, "coarse_labels": [v // 5 for v in ty]},
        protocol,
    )
    names = [f"fine{k}" for k in range(100)]
    write_pickle(
        d / "meta",
        {"fine_label_names": names, "coarse_label_names": [f"c{k}" for k in range(20)]},
        protocol,
    )
    return {
        "train_x": x,
        "train_y": np.array(y),
        "test_x": tx,
        "test_y": np.array(ty),
        "names": names,
    }


def _records(x: np.ndarray, labels: list[np.ndarray]) -> bytes:
    cols = [np.asarray(v, np.uint8)[:, None] for v in labels] + [x.reshape(len(x), -1)]
    return np.concatenate(cols, axis=1).tobytes()


def write_cifar10_binary(root: Path, per_batch: int = 3, n_test: int = 4) -> dict:
    """cifar-10-batches-bin/data_batch_1..5.bin, test_batch.bin: records of 1 label byte +
    3072 image bytes (R, G, B planes); batches.meta.txt: one class name per line."""
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    xs, ys = [], []
    for b in range(1, 6):
        x = images_uint8(per_batch, 32, 32, seed=10 + b)
        y = np.array([(b + j) % 10 for j in range(per_batch)])
        (d / f"data_batch_{b}.bin").write_bytes(_records(x, [y]))
        xs.append(x)
        ys.append(y)
    tx, ty = images_uint8(n_test, 32, 32, seed=77), np.arange(n_test) % 10
    (d / "test_batch.bin").write_bytes(_records(tx, [ty]))
    names = [f"bin{k}" for k in range(10)]
    (d / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    return {
        "train_x": np.concatenate(xs),
        "train_y": np.concatenate(ys),
        "test_x": tx,
        "test_y": ty,
        "names": names,
    }


def write_cifar100_binary(root: Path, n_train: int = 10, n_test: int = 3) -> dict:
    """cifar-100-binary/train.bin, test.bin: records of coarse byte, fine byte, 3072 bytes."""
    d = root / "cifar-100-binary"
    d.mkdir(parents=True)
    x, tx = images_uint8(n_train, 32, 32, 21), images_uint8(n_test, 32, 32, 22)
    y, ty = (np.arange(n_train) * 11) % 100, (np.arange(n_test) * 13) % 100
    (d / "train.bin").write_bytes(_records(x, [y // 5, y]))
    (d / "test.bin").write_bytes(_records(tx, [ty // 5, ty]))
    names = [f"f{k}" for k in range(100)]
    (d / "fine_label_names.txt").write_text("\n".join(names) + "\n")
    (d / "coarse_label_names.txt").write_text("\n".join(f"c{k}" for k in range(20)) + "\n")
    return {"train_x": x, "train_y": y, "test_x": tx, "test_y": ty, "names": names}


def write_stl10(root: Path, n_train: int = 6, n_test: int = 4) -> dict:
    """stl10_binary/{train,test}_{X,y}.bin: X holds each image column-major (torchvision reads
    reshape(-1, 3, 96, 96) then transpose(0, 1, 3, 2)); y holds labels 1..10."""
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    out = {}
    for part, n, seed in (("train", n_train, 31), ("test", n_test, 32)):
        x = images_uint8(n, 96, 96, seed)
        y = (np.arange(n) % 10) + 1
        (d / f"{part}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())
        (d / f"{part}_y.bin").write_bytes(y.astype(np.uint8).tobytes())
        out[f"{part}_x"], out[f"{part}_y"] = x, y - 1
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (d / "class_names.txt").write_text("\n".join(names) + "\n")
    out["names"] = names
    return out


def item_uint8(item: dict) -> np.ndarray:
    """An item's image back to uint8 [3, H, W]."""
    return (item["image"] * 255.0).round().to(torch.uint8).numpy()


def count_decodes(ds, monkeypatch) -> dict:
    """``{"image": n, "mask": n}``: how often a BrodenDataset decodes an image and a mask from
    now on (its decoders wrapped with ``monkeypatch``)."""
    counts = {"image": 0, "mask": 0}
    real_image, real_mask = ds._decode_image, ds._decode_mask

    def image(*args):
        counts["image"] += 1
        return real_image(*args)

    def mask(*args, **kwargs):
        counts["mask"] += 1
        return real_mask(*args, **kwargs)

    monkeypatch.setattr(ds, "_decode_image", image)
    monkeypatch.setattr(ds, "_decode_mask", mask)
    return counts
