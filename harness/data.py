"""Long-tailed subsets, the held-out validation split and shot groups (DESIGN.md §2).

Everything here is pure index arithmetic on label arrays, so it is exact and
cheap to test; the image tensors are attached in `harness.datasets`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from harness import HarnessError

GENERATORS = ("ldam", "first")
SHOT_GROUPS = ("many", "medium", "few")
VAL_SEED = 12345  # fixed: the validation split belongs to the benchmark, not to a run seed


def lt_counts(n_max: int, num_classes: int, rho: float) -> list[int]:
    """Exponential profile: class c keeps int(n_max * rho ** (-c / (C - 1)))."""
    if rho < 1:
        raise HarnessError(f"imbalance ratio rho must be >= 1, got {rho}; pass e.g. --rho 100")
    if num_classes == 1:
        return [n_max]
    return [int(n_max * rho ** (-c / (num_classes - 1))) for c in range(num_classes)]


def check_tail(n_max: int, num_classes: int, rho: float, what: str) -> None:
    """Refuse a profile that would leave a class without a training image (the tail keeps
    int(n_max / rho)): its accuracy, and a prior or class weight built on its count, mean nothing."""
    if min(lt_counts(n_max, num_classes, rho)) >= 1:
        return
    largest = n_max   # int() rounds n_max * n_max ** -1 down to 0 for some n_max (49, 98, ...)
    while largest > 1 and min(lt_counts(n_max, num_classes, largest)) < 1:
        largest -= 1
    raise HarnessError(f"rho {rho:g} leaves the tail classes of {what} without a training image; "
                       f"the largest rho it allows is {largest} (n_max {n_max})")


def select_lt(targets: np.ndarray, counts: list[int], generator: str = "ldam") -> np.ndarray:
    """Indices of the long-tailed training subset, grouped by class in label order.

    `ldam` follows kaidic/LDAM-DRW: numpy seeded with 0 once, then for each class
    in order shuffle that class's indices and keep the first n_c. `first` keeps the
    first n_c of each class in file order (the weight-balancing code).
    """
    if generator not in GENERATORS:
        raise HarnessError(f"unknown LT generator '{generator}'; known: {', '.join(GENERATORS)}")
    targets = np.asarray(targets)
    rng = np.random.RandomState(0)
    picked = []
    for c, n_c in enumerate(counts):
        idx = np.where(targets == c)[0]
        if len(idx) < n_c:
            raise HarnessError(f"class {c} has {len(idx)} training images, the profile needs {n_c}")
        if generator == "ldam":
            rng.shuffle(idx)
        picked.append(idx[:n_c])
    return np.concatenate(picked)


def holdout_val(targets: np.ndarray, kept: np.ndarray, per_class: int) -> np.ndarray:
    """A validation split drawn from training images the LT subset did not keep:
    `per_class` images per class, or all that are left where fewer remain. At rho > 1
    the head class keeps every training image (n_0 = n_max), so it has none; its
    validation accuracy is then absent (NaN), never counted as 0."""
    targets = np.asarray(targets)
    if per_class <= 0:
        return np.zeros(0, dtype=np.int64)
    unused = np.ones(len(targets), dtype=bool)
    unused[kept] = False
    rng = np.random.RandomState(VAL_SEED)
    picked = []
    for c in range(int(targets.max()) + 1):
        pool = np.where(unused & (targets == c))[0]
        picked.append(np.sort(rng.choice(pool, min(per_class, len(pool)), replace=False)))
    out = np.concatenate(picked)
    if len(out) == 0:
        raise HarnessError("no training images are left for a validation split; pass --val-per-class 0")
    return out


def shot_group(count: int) -> str:
    """Many: > 100 training images; medium: 20-100; few: < 20."""
    if count > 100:
        return "many"
    if count >= 20:
        return "medium"
    return "few"


def group_accuracies(per_class_acc: np.ndarray, train_counts: list[int]) -> dict[str, float | None]:
    """Overall top-1 is the mean over classes (test sets are balanced); groups average
    their classes' accuracies. An empty group is None, never 0; classes without
    evaluation images (NaN) are left out."""
    per_class_acc = np.asarray(per_class_acc, dtype=np.float64)
    groups = np.array([shot_group(n) for n in train_counts])
    present = ~np.isnan(per_class_acc)  # a class with no evaluation images has no accuracy
    out: dict[str, float | None] = {}
    for g in ("all",) + SHOT_GROUPS:
        mask = present & ((groups == g) if g != "all" else True)
        out[g] = float(per_class_acc[mask].mean()) if mask.any() else None
    return out


ECE_BINS = 15   # MiSLAS's (utils/metric.py, `calibration`), as the LTR papers after it report ECE


@dataclass(frozen=True)
class ConfidenceBin:
    """One of the 15 equal-width confidence bins, ((index − 1)/15, index/15], with images in it."""
    index: int              # 1 ... 15
    images: int
    accuracy: float         # of its images, a fraction
    confidence: float       # their mean top probability

    @property
    def centre(self) -> float:
        return (self.index - 0.5) / ECE_BINS


def confidence_bins(probs: torch.Tensor, target: torch.Tensor) -> list[ConfidenceBin]:
    """The images by confidence (top softmax probability) in MiSLAS's 15 equal-width bins, each
    closed on the right (np.digitize(..., right=True)): the bins that hold images, in order. The
    reliability diagram's points, and ECE's terms."""
    confidence, pred = probs.max(1)
    confidence = confidence.double().cpu().numpy()
    correct = (pred == target).cpu().numpy()
    bins = np.digitize(confidence, np.linspace(0.0, 1.0, ECE_BINS + 1), right=True)
    return [ConfidenceBin(int(b), int((bins == b).sum()), float(correct[bins == b].mean()),
                          float(confidence[bins == b].mean())) for b in np.unique(bins)]


def calibration_error(probs: torch.Tensor, target: torch.Tensor) -> float | None:
    """Expected calibration error in percent, as MiSLAS measures it: the image-weighted mean over
    the confidence bins of |accuracy − mean confidence|. None without images."""
    if len(target) == 0:
        return None
    gaps = [abs(b.accuracy - b.confidence) * b.images for b in confidence_bins(probs, target)]
    return float(sum(gaps) / len(target) * 100.0)


def group_calibration_errors(probs: torch.Tensor, target: torch.Tensor,
                             train_counts: list[int]) -> dict[str, float | None]:
    """ECE (percent) over all images and over the images of each shot group's classes."""
    groups = np.array([shot_group(n) for n in train_counts])[target.cpu().numpy()]
    out = {"all": calibration_error(probs, target)}
    for g in SHOT_GROUPS:
        mask = torch.from_numpy(groups == g).to(target.device)
        out[g] = calibration_error(probs[mask], target[mask])
    return out


def per_class_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> np.ndarray:
    correct = torch.zeros(num_classes, dtype=torch.float64, device=pred.device)
    total = torch.zeros(num_classes, dtype=torch.float64, device=pred.device)
    total.index_add_(0, target, torch.ones_like(target, dtype=torch.float64))
    correct.index_add_(0, target, (pred == target).to(torch.float64))
    acc = (correct / total.clamp_min(1)).cpu().numpy()
    acc[total.cpu().numpy() == 0] = np.nan  # no images of that class in this split
    return acc


@dataclass
class LTData:
    """A long-tailed benchmark instance: uint8 NCHW image tensors and int64 labels."""

    name: str
    num_classes: int
    class_names: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_counts: list[int] = field(default_factory=list)
    data_name: str | None = None   # which data, where the dataset is whatever the user gives (FileLTData's)

    def checksum(self) -> str:
        """sha256 over the exact tensors a run sees (provenance)."""
        return tensors_digest(self.train_x, self.train_y, self.val_x, self.val_y, self.test_x, self.test_y)

    def training_checksum(self) -> str:
        """sha256 over the training tensors alone: what stage 1 learns from (its cache key), the
        same whichever validation split was held out beside them."""
        return tensors_digest(self.train_x, self.train_y)


def tensors_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()
