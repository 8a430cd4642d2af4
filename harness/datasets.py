"""Registered datasets: where the images come from and how they are normalised.

Each dataset is a `DatasetSpec` exposed through the `harness.datasets`
entry-point group. Loaders return full uint8 NCHW tensors; the LT subset and
the validation split are cut by `harness.data`.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from harness import HarnessError
from harness.data import LTData, check_tail, holdout_val, lt_counts, select_lt

FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class RawSplits:
    train_x: torch.Tensor  # uint8 N,C,H,W
    train_y: np.ndarray
    test_x: torch.Tensor
    test_y: np.ndarray
    class_names: list[str]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    num_classes: int
    n_max: int
    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool
    backbone: str
    loader: Callable[..., RawSplits]   # (spec, data root, download, cache folder) -> RawSplits
    source: str
    augmentation: str = "crop+flip"   # the default; a recipe may name its own

    natural_rho = None  # these datasets are cut to any rho from balanced sources

    def check_rho(self, rho: float) -> None:
        """Refuse a profile that would leave a class without a training image."""
        check_tail(self.n_max, self.num_classes, rho, self.name)

    def holds_validation(self, generator: str, val_per_class: int) -> bool:
        """Whether a run has a validation split: one is held out of the images the profile left."""
        return val_per_class > 0

    def data_name(self, data_root: Path | None) -> str | None:
        """Which data, where the dataset is whatever the user gives; a registered benchmark's is itself."""
        return None

    def device_data(self, data: LTData, device, recipe: dict | None = None):
        """The data on the device, with the recipe's augmentation (crop, flip) and normalisation."""
        from harness.engine import DeviceData

        recipe = recipe or {}
        tokens = recipe.get("augmentation", self.augmentation).split("+")
        streamed_only = [t for t in tokens if t in ("rrc", "jitter")]
        if streamed_only:
            raise HarnessError(f"augmentation {'+'.join(streamed_only)} is for streamed datasets; {self.name} "
                               "takes crop, flip, autoaugment and cutout")
        mean, std = normalisation(recipe, self.mean, self.std, self.channels, self.name)
        return DeviceData(data, mean, std, self.crop_padding if "crop" in tokens else 0,
                          self.flip and "flip" in tokens, device)

    def build(self, rho: float, generator: str, val_per_class: int,
              data_root: Path | None, download: bool = False, cache: Path | None = None) -> LTData:
        counts = lt_counts(self.n_max, self.num_classes, rho)
        raw = self.loader(self, data_root, download, cache)
        check_shapes(self, raw)
        kept = select_lt(raw.train_y, counts, generator)
        val = holdout_val(raw.train_y, kept, val_per_class)
        kept_t = torch.from_numpy(kept)
        val_t = torch.from_numpy(val)
        return LTData(
            name=self.name,
            num_classes=self.num_classes,
            class_names=raw.class_names,
            train_x=raw.train_x[kept_t].contiguous(),
            train_y=torch.from_numpy(np.asarray(raw.train_y)[kept]).long(),
            val_x=raw.train_x[val_t].contiguous(),
            val_y=torch.from_numpy(np.asarray(raw.train_y)[val]).long(),
            test_x=raw.test_x,
            test_y=torch.from_numpy(np.asarray(raw.test_y)).long(),
            train_counts=counts,
        )


def normalisation(recipe: dict, mean, std, channels: int, name: str) -> tuple[tuple, tuple]:
    """The recipe's `normalisation: {mean, std}` (a number or one per channel), else the dataset's."""
    given = recipe.get("normalisation") or {}
    out = []
    for key, default in (("mean", mean), ("std", std)):
        value = given.get(key, default)
        values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * channels
        if len(values) != channels or not all(isinstance(v, (int, float)) for v in values) or \
                (key == "std" and min(values) <= 0):
            raise HarnessError(f"normalisation {key} {value!r} does not fit the {channels} channel(s) of {name}")
        out.append(values)
    return out[0], out[1]


def check_shapes(spec: DatasetSpec, raw: RawSplits) -> None:
    want = (spec.channels, spec.size, spec.size)
    for split, x in (("train", raw.train_x), ("test", raw.test_x)):
        if tuple(x.shape[1:]) != want:
            raise HarnessError(
                f"{spec.name}: {split} images are {tuple(x.shape[1:])}, expected {want} (C,H,W); "
                "point --data-root at the original dataset"
            )
    if len(raw.class_names) != spec.num_classes:
        raise HarnessError(f"{spec.name}: found {len(raw.class_names)} classes, expected {spec.num_classes}")


# ---------------------------------------------------------------- image folders

def image_folder_files(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(file, label) for every image file of `root/<class>/*`, and the class names: classes
    sorted by name and files in name order within a class, images known by their extension
    (torchvision's ImageFolder's, so that a .DS_Store or notes.txt beside them is no sample)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = [(p, label) for label, name in enumerate(classes)
             for p in sorted((root / name).iterdir()) if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
    return files, classes


class UnreadableImage(HarnessError):
    """An image file PIL cannot decode. Raised in a DataLoader worker, it reaches the training
    process re-made from the worker's formatted traceback (torch keeps the type, not the
    exception), whose last line is `harness.datasets.UnreadableImage: <message>`: the message is
    taken back from it, so that the CLI prints one line and the failed run stores it."""

    def __init__(self, message: str):
        if message.startswith("Caught "):
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)

    @classmethod
    def at(cls, path: Path, exc: Exception) -> UnreadableImage:
        return cls(f"cannot decode image {path}: {exc}; replace or remove it")


def decode_file(path: Path, channels: int) -> torch.Tensor:
    """One image file as a (C, H, W) uint8 tensor, with PIL as the streamed loader decodes.
    A JPEG read as greyscale is its decoded luma channel (draft), not a conversion of the
    decoded RGB, which differs by up to 21 levels at colour edges."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    with Image.open(path) as img:
        img.draft(mode, img.size)   # JPEG only (a no-op elsewhere); same size, so no DCT scaling
        pixels = np.array(img.convert(mode))   # a writable copy for torch
    return torch.from_numpy(pixels[..., None] if channels == 1 else pixels).permute(2, 0, 1).contiguous()


def load_image_folder(root: Path, channels: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Decode `root/<class>/*` (in `image_folder_files` order) into one uint8 tensor."""
    files, classes = image_folder_files(root)
    if not classes:
        raise HarnessError(f"no class folders under {root}; expected {root}/<class>/<image>")
    images, labels = [], []
    for path, label in files:
        try:
            images.append(decode_file(path, channels))
        except (OSError, ValueError) as exc:  # PIL: not an image (UnidentifiedImageError), truncated file
            raise UnreadableImage.at(path, exc) from exc
        labels.append(label)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise HarnessError(f"images under {root} differ in size ({sorted(shapes)[:3]}...); resize them first")
    return torch.stack(images), np.asarray(labels, dtype=np.int64), classes


def folder_layout(root: Path | None) -> Path | None:
    """The directory holding train/ and test/, accepting one wrapping folder."""
    if root is None or not root.is_dir():
        return None
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    subdirs = [d for d in root.iterdir() if d.is_dir()]
    for d in subdirs:
        if (d / "train").is_dir() and (d / "test").is_dir():
            return d
    return None


def folder_signature(top: Path, channels: int) -> str:
    """Path, file count, total size and newest mtime: changes whenever the tree does."""
    count = size = newest = 0
    for dirpath, _, files in os.walk(top):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            count, size, newest = count + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    text = f"{top.resolve()}|{count}|{size}|{newest}|{channels}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def load_folder_splits(spec: DatasetSpec, top: Path, cache: Path | None = None) -> RawSplits:
    """Decode train/ and test/ once; later runs read the decoded tensors from the cache folder."""
    from harness.checkpoints import cache_root, load_checkpoint, save_atomic

    cached_path = cache_root(cache) / "decoded" / f"{folder_signature(top, spec.channels)}.pt"
    cached = load_checkpoint(cached_path)
    if cached is not None:
        return RawSplits(cached["train_x"], cached["train_y"].numpy(), cached["test_x"], cached["test_y"].numpy(),
                         list(cached["classes"]))
    train_x, train_y, classes = load_image_folder(top / "train", spec.channels)
    test_x, test_y, test_classes = load_image_folder(top / "test", spec.channels)
    if test_classes != classes:
        raise HarnessError(f"train and test class folders differ under {top}")
    save_atomic(cached_path, {"train_x": train_x, "train_y": torch.from_numpy(train_y), "test_x": test_x,
                              "test_y": torch.from_numpy(test_y), "classes": classes})
    return RawSplits(train_x, train_y, test_x, test_y, classes)


# ---------------------------------------------------------------- CIFAR

def load_cifar(spec: DatasetSpec, root: Path | None, download: bool, cache: Path | None = None) -> RawSplits:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if spec.num_classes == 10 else CIFAR100
    folder = folder_layout(root)
    if folder is not None:
        return load_folder_splits(spec, folder, cache)
    if root is None:
        root = Path("data")
    pickled = root / cls.base_folder
    if not pickled.is_dir() and not download:
        raise HarnessError(
            f"no {spec.title} data under {root}: pass --data-root DIR holding {cls.base_folder}/ "
            "or train/<class>/ + test/<class>/, or add --download to fetch it with torchvision"
        )
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=False)
    except Exception as exc:  # torchvision raises RuntimeError/URLError/UnpicklingError
        # torchvision extracts an archive it finds in the root instead of fetching it
        offline = f"; without a network, copy {cls.filename} ({cls.url}) into {root} and run again" \
            if download and isinstance(exc, OSError) else ""
        raise HarnessError(f"cannot read {spec.title} under {root}: {type(exc).__name__}: {exc}{offline}") from exc

    def to_tensor(arr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    return RawSplits(to_tensor(train.data), np.asarray(train.targets), to_tensor(test.data),
                     np.asarray(test.targets), list(train.classes))


# ---------------------------------------------------------------- Fashion-MNIST

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic, dims as big-endian int32, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


def find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def load_fmnist(spec: DatasetSpec, root: Path | None, download: bool, cache: Path | None = None) -> RawSplits:
    candidates = [p for p in (root, root / "FashionMNIST" / "raw" if root else None, FMNIST_SYSTEM_DIR) if p]
    for directory in candidates:
        files = {k: [find_idx(directory, s) for s in v] for k, v in FMNIST_FILES.items()}
        if all(p is not None for pair in files.values() for p in pair):
            (trx, try_), (tex, tey) = files["train"], files["test"]
            return RawSplits(
                torch.from_numpy(read_idx(trx).copy()).unsqueeze(1), read_idx(try_).astype(np.int64),
                torch.from_numpy(read_idx(tex).copy()).unsqueeze(1), read_idx(tey).astype(np.int64),
                list(FMNIST_CLASSES))
    if download:
        from torchvision.datasets import FashionMNIST

        target = root or Path("data")
        try:
            FashionMNIST(str(target), train=True, download=True)
            FashionMNIST(str(target), train=False, download=True)
        except Exception as exc:
            raise HarnessError(f"Fashion-MNIST download failed ({type(exc).__name__}: {exc}); "
                               "install Debian's dataset-fashion-mnist instead") from exc
        return load_fmnist(spec, target / "FashionMNIST" / "raw", download=False)
    raise HarnessError(
        "no Fashion-MNIST data: install Debian's package (apt-get install dataset-fashion-mnist) "
        "or add --download to fetch it with torchvision"
    )


CIFAR10_LT = DatasetSpec(
    name="cifar10-lt", title="CIFAR-10-LT", num_classes=10, n_max=5000, channels=3, size=32,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), crop_padding=4, flip=True,
    backbone="resnet32", loader=load_cifar, source="CIFAR-10 (torchvision or image folder)")
CIFAR100_LT = DatasetSpec(
    name="cifar100-lt", title="CIFAR-100-LT", num_classes=100, n_max=500, channels=3, size=32,
    mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010), crop_padding=4, flip=True,
    backbone="resnet32", loader=load_cifar, source="CIFAR-100 (torchvision or image folder)")
FMNIST_LT = DatasetSpec(
    name="fmnist-lt", title="Fashion-MNIST-LT", num_classes=10, n_max=500, channels=1, size=28,
    mean=(0.2860,), std=(0.3530,), crop_padding=2, flip=True,
    backbone="fmnist-cnn", loader=load_fmnist, source="Fashion-MNIST IDX (Debian or torchvision)")
