"""Benchmarks too large for device memory: ImageNet-LT, Places-LT, iNaturalist-2018.

The user supplies the image root and the standard split lists (`relative/path label`
per line, from the OLTR / classifier-balancing releases). Images are decoded and
augmented by a DataLoader with workers and pinned memory (DESIGN.md §2: train
RandomResizedCrop + flip (+ ColorJitter), test Resize + CenterCrop) and fed to the
same engine; `StreamData` offers the engine and the methods what `DeviceData` does.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness import HarnessError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------- split lists

def read_split_list(path: Path) -> list[tuple[str, int]]:
    """`relative/path label` per line; a clear error names the file and line at fault."""
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise HarnessError(f"{path} line {n}: expected 'relative/path label', got {line[:80]!r}")
        items.append((parts[0], int(parts[1])))
    return items


@dataclass
class FileLTData:
    """A long-tailed benchmark whose images stay on disk: lists of (path, label)."""

    name: str
    root: Path
    num_classes: int
    class_names: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    train_counts: list[int] = field(default_factory=list)
    list_digest: str = ""
    # which data, where the dataset is whatever folder the user gives (folder-lt): its runs are
    # recorded with it, and a board ranks the runs of one folder only
    data_name: str | None = None

    def checksum(self) -> str:
        """sha256 over the split lists a run sees (the images are the user's files): the same
        wherever the data lies, so two machines' runs of one release show they read one split."""
        return self.list_digest

    def training_checksum(self) -> str:
        """sha256 over the training list and its root: what stage 1 learns from (its cache key)."""
        return hashlib.sha256(repr((str(self.root.resolve()), self.train)).encode()).hexdigest()


@dataclass(frozen=True)
class ListDatasetSpec:
    """A dataset given as an image root plus split lists, validated against the
    counts of its release (DESIGN.md §2)."""

    name: str
    title: str
    num_classes: int
    lists: dict                 # split -> file name under the root ("val" may be absent; iNat tests on val)
    expected: dict              # split -> number of images the release has
    backbone: str = "resnet50"
    source: str = ""
    augmentation: str = "rrc+flip+jitter"  # the default; a recipe may name its own
    size: int = 224
    resize: int = 256
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    workers: int = min(8, os.cpu_count() or 1)
    streamed: bool = True

    @property
    def n_max(self) -> str:
        return "natural"

    def _root(self, data_root: Path | None) -> Path:
        if data_root is None:
            raise HarnessError(f"{self.title} is not downloadable: pass --data-root DIR holding the images and "
                               f"{', '.join(self.lists.values())}")
        return data_root

    def _list(self, data_root: Path, split: str) -> Path:
        path = data_root / self.lists[split]
        if not path.is_file():
            raise HarnessError(f"{self.title}: split list {path} is missing; put {self.lists[split]} (the OLTR / "
                               "classifier-balancing release) in --data-root")
        return path

    def check_rho(self, rho: float) -> None:
        """Refuse a ratio before the data is read (a sweep's --dry-run included): the release's
        split lists are its only long tail."""
        raise HarnessError(f"{self.title} has a fixed long tail (its split lists); pass --rho natural")

    def holds_validation(self, generator: str, val_per_class: int) -> bool:
        """Whether a run has a validation split: the release's val list at its natural ratio (iNat
        has none: its val images are its test set), else one held out of the images left over."""
        return "val" in self.lists if generator == "natural" else val_per_class > 0

    def data_name(self, data_root: Path | None) -> str | None:
        """Which data, where the dataset is whatever the user gives; a release's is itself."""
        return None

    def natural_rho(self, data_root: Path | None) -> float:
        """n_max / n_min of the release's training list (the only ratio it has)."""
        path = self._list(self._root(data_root), "train")
        return ratio(np.bincount([y for _, y in read_split_list(path)]))

    def build(self, rho, generator, val_per_class, data_root: Path | None, download: bool = False,
              cache: Path | None = None) -> FileLTData:
        data_root = self._root(data_root)
        if generator != "natural":
            raise HarnessError(f"{self.title} has a fixed long tail (its split lists); pass --rho natural")
        digest = hashlib.sha256()
        splits = {}
        for split, name in self.lists.items():
            path = self._list(data_root, split)
            digest.update(path.read_bytes())
            splits[split] = read_split_list(path)
            want = self.expected.get(split)
            if want is not None and len(splits[split]) != want:
                raise HarnessError(f"{self.title}: {name} lists {len(splits[split]):,} images, the release has "
                                   f"{want:,}; check the file")
        labels = np.array([y for _, y in splits["train"]])
        if labels.min() < 0 or labels.max() >= self.num_classes or len(np.unique(labels)) != self.num_classes:
            raise HarnessError(f"{self.title}: {self.lists['train']} has labels {labels.min()}..{labels.max()} over "
                               f"{len(np.unique(labels))} classes, expected 0..{self.num_classes - 1}")
        for split, items in splits.items():
            missing = [p for p, _ in items if not (data_root / p).is_file()]
            if missing:
                raise HarnessError(f"{self.title}: {len(missing):,} {split} images listed in {self.lists[split]} are "
                                   f"missing under {data_root}, e.g. {missing[0]}")
        counts = np.bincount(labels, minlength=self.num_classes).tolist()
        if abs(float(rho) - ratio(counts)) > 1e-9 * ratio(counts):  # a ratio it does not have
            raise HarnessError(f"{self.title} has a fixed long tail (rho {ratio(counts):g}, its split lists); "
                               "pass --rho natural")
        return FileLTData(self.name, data_root, self.num_classes, [str(c) for c in range(self.num_classes)],
                          splits["train"], splits.get("val", []), splits["test"], counts, digest.hexdigest())

    def device_data(self, data: FileLTData, device: torch.device, recipe: dict | None = None) -> "StreamData":
        """Streamed batches with the recipe's augmentation (rrc, flip, jitter) and normalisation."""
        from harness.datasets import normalisation

        recipe = recipe or {}
        tokens = recipe.get("augmentation", self.augmentation).split("+")
        device_only = [t for t in tokens if t in ("crop", "autoaugment", "cutout")]
        if device_only:
            raise HarnessError(f"augmentation {'+'.join(device_only)} needs device-resident images; {self.name} "
                               "takes rrc, flip and jitter")
        mean, std = normalisation(recipe, self.mean, self.std, self.channels, self.name)
        return StreamData(self, data, device, tokens, mean, std)


def ratio(counts) -> float:
    counts = np.asarray(counts)
    return float(counts.max() / max(1, counts[counts > 0].min()))


@dataclass(frozen=True)
class FolderLTSpec(ListDatasetSpec):
    """`folder-lt`: any `train/<class>/*` + `test/<class>/*` tree, made long-tailed with
    the exponential profile at a chosen rho (n_max = the smallest class, so every class
    can fill its quota; validation held out from the images left over), or used with
    its own counts (`--rho natural`, no validation split)."""

    num_classes: int = 0        # known once the tree is read
    lists: dict = field(default_factory=dict)
    expected: dict = field(default_factory=dict)

    @property
    def n_max(self) -> str:
        return "smallest class"

    def _tree(self, data_root: Path | None) -> dict[str, list[tuple[str, int]]]:
        from harness.datasets import folder_layout, image_folder_files

        top = folder_layout(data_root)
        if top is None:
            raise HarnessError(f"folder-lt needs --data-root DIR with train/<class>/ and test/<class>/; "
                               f"none under {data_root}")
        (train, classes), (test, test_classes) = (image_folder_files(top / split) for split in ("train", "test"))
        if not classes or classes != test_classes:
            raise HarnessError(f"train/ and test/ under {top} must hold the same, non-empty set of class folders")
        for split, files in (("train", train), ("test", test)):   # a class without images has no accuracy
            present = {y for _, y in files}
            empty = [name for label, name in enumerate(classes) if label not in present]
            if empty:
                raise HarnessError(f"class folder {top / split / empty[0]} holds no image files"
                                   f"{f' (nor {len(empty) - 1} more)' if len(empty) > 1 else ''}; "
                                   "add images or remove the class from train/ and test/")
        relative = lambda files: [(str(p.relative_to(top)), c) for p, c in files]  # noqa: E731
        return {"classes": classes, "top": top, "train": relative(train), "test": relative(test)}

    def check_rho(self, rho: float) -> None:
        """Any ratio: the tail it leaves is checked once the tree is read (its smallest class is n_max)."""

    def natural_rho(self, data_root: Path | None) -> float:
        return ratio(np.bincount([y for _, y in self._tree(data_root)["train"]]))

    def data_name(self, data_root: Path | None) -> str | None:
        """None without a folder there: the run is the one to refuse it, with the fix."""
        from harness.datasets import folder_layout

        return folder_name(self._tree(data_root)) if folder_layout(data_root) is not None else None

    def build(self, rho, generator, val_per_class, data_root: Path | None, download: bool = False,
              cache: Path | None = None) -> FileLTData:
        from harness.data import check_tail, holdout_val, lt_counts, select_lt

        tree = self._tree(data_root)
        items, classes = tree["train"], tree["classes"]
        labels = np.array([y for _, y in items])
        available = np.bincount(labels, minlength=len(classes))
        if generator == "natural":
            train, val = items, []
        else:
            n_max = int(available.min())   # the smallest class can fill every class's quota
            check_tail(n_max, len(classes), rho, f"{self.name} at {tree['top']}")
            kept = select_lt(labels, lt_counts(n_max, len(classes), rho), generator)
            held = holdout_val(labels, kept, val_per_class)
            train, val = [items[i] for i in kept], [items[i] for i in held]
        counts = np.bincount([y for _, y in train], minlength=len(classes)).tolist()
        digest = hashlib.sha256(repr((train, val, tree["test"])).encode()).hexdigest()
        return FileLTData(self.name, tree["top"], len(classes), classes, train, val, tree["test"], counts, digest,
                          folder_name(tree))


def folder_name(tree: dict) -> str:
    """An image folder as its boards name it: the folder's name and a digest of its class folders'
    files (wherever it lies, whatever ratio and validation split are cut from it), so that two
    folders, or one whose images changed, are never ranked on one board."""
    files = hashlib.sha256(repr((tree["classes"], tree["train"], tree["test"])).encode()).hexdigest()
    return f"{tree['top'].resolve().name} {files[:8]}"


# ---------------------------------------------------------------- decoding and augmentation

class FileDataset(torch.utils.data.Dataset):
    def __init__(self, root: Path, items: list[tuple[str, int]], transform):
        self.root, self.items, self.transform = root, items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        from harness.datasets import UnreadableImage

        path, label = self.items[i]
        try:
            with Image.open(self.root / path) as img:
                rgb = img.convert("RGB")
        except (OSError, ValueError) as exc:  # PIL: not an image (UnidentifiedImageError), truncated file
            raise UnreadableImage.at(self.root / path, exc) from None
        return self.transform(rgb), label


def transforms_for(spec: ListDatasetSpec, train: bool, tokens=("rrc", "flip", "jitter"), mean=None, std=None):
    """Train: RandomResizedCrop + flip (+ ColorJitter 0.4/0.4/0.4) as the recipe's tokens say;
    test: Resize + CenterCrop. Then normalisation."""
    from torchvision.transforms import v2

    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean or spec.mean, std or spec.std)]
    if not train:
        return v2.Compose([v2.Resize(spec.resize), v2.CenterCrop(spec.size), *tail])
    steps = [v2.RandomResizedCrop(spec.size) if "rrc" in tokens else v2.Compose([v2.Resize(spec.resize),
                                                                                  v2.CenterCrop(spec.size)])]
    steps += [v2.RandomHorizontalFlip()] if "flip" in tokens else []
    steps += [v2.ColorJitter(0.4, 0.4, 0.4)] if "jitter" in tokens else []
    return v2.Compose([*steps, *tail])


class StreamData:
    """What the engine needs of a run's data, streamed from files: labels on the
    device, training batches in a given order, evaluation batches per split."""

    streamed = True
    precision: str | None = None   # as DeviceData's

    def __init__(self, spec: ListDatasetSpec, data: FileLTData, device: torch.device, tokens=("rrc", "flip", "jitter"),
                 mean=None, std=None, eval_batch: int = 256):
        self.spec, self.data, self.device, self.eval_batch = spec, data, device, eval_batch
        self.mean, self.std = mean or spec.mean, std or spec.std
        self.num_classes = data.num_classes
        as_labels = lambda items: torch.tensor([y for _, y in items], dtype=torch.long, device=device)  # noqa: E731
        self.train_y, self.val_y, self.test_y = as_labels(data.train), as_labels(data.val), as_labels(data.test)
        self.train_counts = torch.bincount(self.train_y, minlength=self.num_classes)
        self.train_set = FileDataset(data.root, data.train, transforms_for(spec, True, tokens, self.mean, self.std))

    @property
    def n_train(self) -> int:
        return len(self.data.train)

    def inputs(self) -> dict:
        """How a test image becomes the model's input (a saved model's users need it)."""
        return {"mean": list(self.mean), "std": list(self.std),
                "pixels": f"RGB, Resize({self.spec.resize}), CenterCrop({self.spec.size}), x / 255, "
                          "then (x - mean) / std per channel"}

    def labels(self, split: str) -> torch.Tensor:
        return {"train": self.train_y, "val": self.val_y, "test": self.test_y}[split]

    def _loader(self, dataset, batch_size: int, order=None, seed: int | None = None):
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        workers = self.spec.workers
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=order, num_workers=workers, generator=gen,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if workers else None)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    def train_batches(self, order: torch.Tensor, batch_size: int, seed: int):
        """Batches in exactly `order` (the engine's sampler); the workers' random crops,
        flips and jitter follow `seed`, so an epoch is reproducible and resumable."""
        for x, y in self._loader(self.train_set, batch_size, order.tolist(), seed):
            yield self._to_device(x), y.to(self.device, non_blocking=True)

    def eval_batches(self, split: str):
        """Un-augmented (test-transform) batches of "train", "val" or "test", in order."""
        items = {"train": self.data.train, "val": self.data.val, "test": self.data.test}[split]
        dataset = FileDataset(self.data.root, items, transforms_for(self.spec, False, mean=self.mean, std=self.std))
        for x, _ in self._loader(dataset, self.eval_batch):
            yield self._to_device(x)


IMAGENET_LT = ListDatasetSpec(
    name="imagenet-lt", title="ImageNet-LT", num_classes=1000,
    lists={"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"},
    expected={"train": 115_846, "val": 20_000, "test": 50_000}, backbone="resnext50_32x4d",
    source="ImageNet-2012 images + OLTR split lists (user-supplied)")
PLACES_LT = ListDatasetSpec(
    name="places-lt", title="Places-LT", num_classes=365,
    lists={"train": "Places_LT_train.txt", "val": "Places_LT_val.txt", "test": "Places_LT_test.txt"},
    expected={"train": 62_500, "val": 7_300, "test": 36_500}, backbone="resnet152+pretrained",
    source="Places-365 images + OLTR split lists (user-supplied)")
INAT2018 = ListDatasetSpec(
    name="inat2018", title="iNaturalist-2018", num_classes=8142,
    lists={"train": "iNaturalist18_train.txt", "test": "iNaturalist18_val.txt"},
    expected={"train": 437_513, "test": 24_426}, backbone="resnet50", augmentation="rrc+flip",
    mean=(0.466, 0.471, 0.380), std=(0.195, 0.194, 0.192),
    source="iNaturalist-2018 images + classifier-balancing lists (user-supplied; val used as test)")
FOLDER_LT = FolderLTSpec(
    name="folder-lt", title="Image folder (LT)", backbone="resnet50",
    source="any train/<class>/ + test/<class>/ tree (--data-root); --rho R or --rho natural")
