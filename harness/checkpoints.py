"""Stage-1 checkpoint cache: written atomically, read with weights_only=True.

Methods whose stage-1 loss and recipe agree on the same data, backbone and seed
share one checkpoint (cRT, LWS and τ-norm reuse CE's)."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from harness import HarnessError


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    return Path(explicit or os.environ.get("HARNESS_CACHE") or ".harness_cache")


def check_folder(root: Path, what: str, fix: str) -> Path:
    """A folder the run writes to, created if missing; a path that cannot be one is refused
    before anything runs."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HarnessError(f"{what} {root} cannot be used ({exc.strerror}); {fix}") from None
    return root


def check_cache_root(root: Path) -> Path:
    return check_folder(root, "cache folder", "pass --cache-dir DIR or set HARNESS_CACHE")


def stage1_key(config: dict, method_identity: dict, training_checksum: str) -> str:
    """Stage 1's identity: the training data, backbone, seed, precision, stage-1 recipe, the input
    pipeline (augmentation, normalisation) and what the method adds (loss, head, optimiser
    groups, batch transforms). Methods that agree on all of it share a checkpoint. The
    validation split is no part of it: stage 1 never learns from it, so a run that holds out
    another (--val-per-class 0 for an oracle τ) reuses the same training."""
    stage1 = {k: v for k, v in config["recipe"]["stage1"].items() if k != "paper_epochs"}
    # a precision asked for is in the stored config only then (RunConfig.to_dict): a run at its
    # device's default keeps the key it had
    identity = {k: config[k] for k in ("dataset", "rho", "generator", "backbone", "seed", "precision")
                if k in config}
    identity.update(stage1=stage1, method=method_identity, data=training_checksum,
                    inputs={k: config["recipe"].get(k) for k in ("augmentation", "normalisation")})
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def stage1_path(root: Path, key: str) -> Path:
    return root / "stage1" / f"{key}.pt"


def save_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # readers see the old file or the whole new one, never a torn write


def load_checkpoint(path: Path) -> dict | None:
    """The payload, or None when absent; a corrupt file is reported and ignored."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, unpickling error, ...
        first_line = (str(exc).strip().splitlines() or [""])[0]
        warnings.warn(f"ignoring unreadable checkpoint {path}: {type(exc).__name__}: {first_line}")
        return None


# ---------------------------------------------------------------- per-epoch checkpoints of a training

def epoch_checkpoint_path(root: Path, key: str) -> Path:
    return root / "partial" / f"{key}.pt"


def _previous(path: Path) -> Path:
    return path.with_name(path.stem + ".prev.pt")


def save_epoch_checkpoint(path: Path, state: dict) -> None:
    """Write this epoch's state, keeping the last one as `.prev.pt`: a kill at any
    moment leaves at least one whole checkpoint behind."""
    if path.is_file():
        os.replace(path, _previous(path))
    save_atomic(path, state)


def load_epoch_checkpoint(path: Path) -> dict | None:
    """The newest readable epoch checkpoint at `path` (falling back to the previous
    one with a warning), or None: start from scratch."""
    for candidate in (path, _previous(path)):
        state = load_checkpoint(candidate)
        if state is None:
            continue
        if isinstance(state, dict) and {"epoch", "model", "optimizer"} <= state.keys():
            return state
        warnings.warn(f"ignoring checkpoint {candidate}: not an epoch checkpoint")
    if path.is_file() or _previous(path).is_file():
        warnings.warn(f"no usable checkpoint at {path}; training from scratch")
    return None


def drop_epoch_checkpoint(path: Path) -> None:
    for candidate in (path, _previous(path)):
        candidate.unlink(missing_ok=True)
