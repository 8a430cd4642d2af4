"""Prepare, on this machine, what the GPU machine lacks for bench/gpu_proof.py.

The GPU machines run Python 3.12 on manylinux x86-64 with torch, torchvision, timm, pandas,
jinja2, click, tabulate, matplotlib, tqdm, pyyaml and pytest, but without SQLAlchemy,
Alembic, Mako or Optuna, and without a network. This writes

  .whl/      the wheels of those packages and of whatever they need that the GPU machine
             lacks (found from each wheel's Requires-Dist), plus the ltr-harness wheel itself:
             the harness registers its methods and datasets through entry points, so it must
             be installed there, not only importable
  .devdata/  cifar10-jpeg.tar.gz, copied from ../shared/data beside the checkout and checked

Both folders are git-ignored; bring them along to the GPU machine.

    python bench/gpu_prep.py [--wheels .whl] [--devdata .devdata]
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
DATA_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DATA_SHA256 = "f33cb8dc523cafd312eb9bfaf0fa9446fdf3c2f43f0ebe40ec62a4e563f153e2"   # shared/data/README.md
MISSING_THERE = ("sqlalchemy", "alembic", "mako", "optuna")
# What the GPU machine already has among the needs of MISSING_THERE (device KINDS.md's list).
PRESENT_THERE = {"numpy", "packaging", "pyyaml", "tqdm", "typing-extensions", "markupsafe"}
TARGET_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
                  "platform_python_implementation": "CPython", "sys_platform": "linux", "os_name": "posix",
                  "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
PIP_TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
              *[arg for n in ("2_28", "2_27", "2_17") for arg in ("--platform", f"manylinux_{n}_x86_64")],
              "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64"]


def pinned(name: str) -> str:
    """`name==version` as installed here, so the GPU machine runs the versions the tests ran
    against; the newest release where it is not installed here."""
    try:
        return f"{name}=={version(name)}"
    except PackageNotFoundError:
        return name


def needs(wheel: Path) -> set[str]:
    """The packages a wheel requires on the GPU machine (no extras)."""
    with zipfile.ZipFile(wheel) as z:
        metadata = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(metadata).decode().splitlines()
    found = set()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(TARGET_MARKERS):
                found.add(canonicalize_name(req.name))
    return found


def wheel_name(wheel: Path) -> str:
    return canonicalize_name(wheel.name.split("-")[0])


def download_wheels(folder: Path) -> list[Path]:
    """MISSING_THERE and, transitively, every need of theirs the GPU machine lacks: one
    version of each (two would stop the install there)."""
    wanted, fetched = set(MISSING_THERE), {}
    while wanted - fetched.keys():
        names = sorted(wanted - fetched.keys())
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", *PIP_TARGET, "-d", str(folder),
                        *map(pinned, names)], check=True)
        for wheel in folder.glob("*.whl"):
            fetched.setdefault(wheel_name(wheel), wheel)
        for name in names:
            wanted |= needs(fetched[name]) - PRESENT_THERE
    return sorted(fetched.values())


def build_harness_wheel(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(folder),
                    str(REPO)], check=True)
    return next(folder.glob("ltr_harness-*.whl"))


def copy_data(devdata: Path) -> Path:
    if not DATA_TAR.is_file():
        sys.exit(f"no {DATA_TAR}: the CIFAR-10 JPEG copy lives in shared/data beside the checkout")
    devdata.mkdir(exist_ok=True)
    target = devdata / DATA_TAR.name
    shutil.copyfile(DATA_TAR, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != DATA_SHA256:
        sys.exit(f"{target} has sha256 {digest}, expected {DATA_SHA256} (shared/data/README.md)")
    return target


def mib(paths) -> float:
    return sum(p.stat().st_size for p in paths) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", type=Path, default=REPO / ".whl")
    ap.add_argument("--devdata", type=Path, default=REPO / ".devdata")
    args = ap.parse_args()
    shutil.rmtree(args.wheels, ignore_errors=True)   # only this run's wheels: one version of each
    args.wheels.mkdir(parents=True)
    wheels = download_wheels(args.wheels) + [build_harness_wheel(args.wheels)]
    tar = copy_data(args.devdata)
    for path in wheels + [tar]:
        print(f"{mib([path]):7.2f} MiB  {path}")
    print(f"{mib(wheels) + mib([tar]):.1f} MiB to bring along (.whl, .devdata); a GPU machine takes 64 MiB a call")


if __name__ == "__main__":
    main()
