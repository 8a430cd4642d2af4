"""Report plots: drawn from small tables, cached by a hash of everything they are drawn from,
rendered in worker processes while the report goes on.

A plot is a `PlotJob`: the name of its drawing and the table it draws. Its PNG is stored
under a key hashing that table, this file's source and the matplotlib and Pillow versions
(drawn in matplotlib's default style, so no matplotlibrc matters), so a cached plot is served
only while nothing that could change its pixels has changed. Each drawing uses
fixed margins (no tight_layout, which draws the figure once more), a fixed title position (no
search for overlapping ticks) and plain tick labels (no mathtext): most of a plot's cost.
"""
from __future__ import annotations

import base64
import hashlib
import io
import math
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd

from harness.report_workers import start_workers

PER_CLASS = "Per-class accuracy"
WEIGHT_NORMS = "Classifier weight norms"
TAU_SWEEP = "τ sweep"
TUNING = "Hyper-parameter search"
RELIABILITY = "Reliability diagram"

DPI = 110
WIDTH, AXES_HEIGHT = 6.4, 2.55                      # inches; the page shows plots 560 px wide
LEFT, RIGHT, TOP, BOTTOM = 0.7, 0.2, 0.5, 0.62     # inches around the axes, before the legend
LEGEND_ROW, LEGEND_FONT = 0.2, 7                     # inches per row of legend entries; points
GROUP_COLOURS = {"all": "#222", "many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}
DASHES = ("-", "--", ":", "-.")


def line_look(index: int) -> dict:
    """The index-th line of a plot (its rows in name order): matplotlib's ten colours, then the
    ten again dashed, and so on, so that no two of a board's rows look alike."""
    return {"color": f"C{index % 10}", "ls": DASHES[index // 10 % len(DASHES)]}

# what decides a plot's pixels besides its data: this file, matplotlib (with its fonts) and Pillow
CODE_ID = hashlib.sha256(Path(__file__).read_bytes()
                         + f"matplotlib {version('matplotlib')}, pillow {version('pillow')}".encode()).hexdigest()


@dataclass(frozen=True)
class PlotJob:
    kind: str               # a key of DRAWINGS
    data: pd.DataFrame

    def key(self) -> str:
        digest = hashlib.sha256(CODE_ID.encode())
        digest.update(self.kind.encode())
        digest.update(self.data.to_csv(index=False).encode())
        return digest.hexdigest()[:32]


# ---------------------------------------------------------------- drawings

MOST_CLASSES = 100    # classes a line shows one by one; of more (ImageNet-LT's 1,000, iNat's 8,142), bin means


def bin_means(x: pd.Series, y: pd.Series, bins: int, log: bool) -> tuple[np.ndarray, np.ndarray]:
    """Means of x and y over `bins` equal-width (log: log-spaced) bins of x, empty ones left out:
    a thousand classes drawn one by one are a band, not a curve."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if log:   # a log axis has no place for a class without training images
        x, y = x[x > 0], y[x > 0]
    scale = np.log(x) if log else x
    edges = np.linspace(scale.min(), scale.max(), bins + 1)
    which = np.clip(np.searchsorted(edges, scale, side="right") - 1, 0, bins - 1)
    means = pd.DataFrame({"bin": which, "x": scale, "y": y}).groupby("bin").mean()
    return (np.exp(means["x"]) if log else means["x"]).to_numpy(), means["y"].to_numpy()


def many_classes(data: pd.DataFrame) -> int | None:
    """The board's number of classes where it is too many to draw one by one, else None."""
    n = int(data.groupby("line").size().max())
    return n if n > MOST_CLASSES else None


def draw_per_class(ax, data: pd.DataFrame) -> None:
    binned = many_classes(data)
    for i, (line, g) in enumerate(data.groupby("line")):
        g = g.sort_values("train_count", ascending=False)
        x, y = bin_means(g["train_count"], g["accuracy"], 30, log=True) if binned else \
            (g["train_count"], g["accuracy"])
        ax.plot(x, y, marker="o", ms=3, lw=1.2, label=line, **line_look(i))
    ax.set_xscale("log")
    plain_log_ticks(ax.xaxis)
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel("test accuracy (%)" + (", bin mean" if binned else ""))
    ax.set_title("Per-class accuracy against training count" +
                 (f"\n{binned:,} classes: means over 30 log-spaced bins of training count" if binned else ""),
                 y=1.0, pad=14, fontsize=None if not binned else 10)
    for edge in (19.5, 100.5):  # shot-group boundaries: few < 20 <= medium <= 100 < many
        ax.axvline(edge, color="#bbb", lw=0.8, ls="--")
    for x, name in ((19.5, "few ←"), (100.5, "→ many")):
        ax.text(x, 1.0, name, transform=ax.get_xaxis_transform(), fontsize=7, color="#888", va="bottom",
                ha="right" if name.startswith("few") else "left")


def draw_weight_norms(ax, data: pd.DataFrame) -> None:
    """Classes from head to tail by training count (a class index is that order only where the
    benchmark numbers its classes so, as the CIFAR-LT cuts do; ImageNet-LT's labels do not)."""
    from matplotlib.ticker import MaxNLocator

    binned = many_classes(data)
    for i, (line, g) in enumerate(data.groupby("line")):
        g = g.sort_values(["train_count", "class_index"], ascending=[False, True], kind="stable")
        rank = pd.Series(np.arange(len(g)))
        x, y = bin_means(rank, g["weight_norm"], 50, log=False) if binned else (rank, g["weight_norm"])
        ax.plot(x, y, marker=".", ms=3, lw=1.2, label=line, **line_look(i))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # a rank: 0.25 of a class is no place
    ax.set_xlabel("classes by training count (head → tail)")
    ax.set_ylabel("‖w_c‖ of the final classifier" + (", bin mean" if binned else ""))
    ax.set_title("Classifier weight norm per class" +
                 (f"\n{binned:,} classes: means over 50 bins of classes" if binned else ""),
                 y=1.0, fontsize=None if not binned else 10)


def draw_tau_sweep(ax, data: pd.DataFrame) -> None:
    """Every shot group's sweep; where the board has τ-norm on several setups, the all-classes
    sweep of each, in a colour of its own (the setups' groups in one colour each would read as one)."""
    several = data["setup"].nunique() > 1
    for i, (setup, s) in enumerate(data.groupby("setup", sort=False)):
        colour = f"C{i}" if several else None   # the colour cycle's
        for (split, group), g in s[s["group"] == "all"].groupby(["split", "group"]) if several else \
                s.groupby(["split", "group"]):
            ax.plot(g["x"], g["value"], lw=2.0 if group == "all" else 1.2, color=colour or GROUP_COLOURS.get(group),
                    ls="-" if split == "test" else "--", label=f"{split} {group}" + (f" ({setup})" if several else ""))
        val_all = s[(s["split"] == "val") & (s["group"] == "all")]
        if not val_all.empty:
            best = float(val_all.loc[val_all["value"].idxmax(), "x"])
            ax.axvline(best, color=colour or "#888", lw=0.8, ls=":")
            ax.text(best, 1.0, f" τ = {best:g} (val)", transform=ax.get_xaxis_transform(), fontsize=7,
                    color=colour or "#555", va="bottom")
    ax.set_xlabel("τ")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("τ-norm sweep: solid test, dashed val", y=1.0, pad=14)


def draw_reliability(ax, data: pd.DataFrame) -> None:
    """Test accuracy per confidence bin against the bin's centre (MiSLAS's Figure 1 as lines, one
    per row of the board): a point under the diagonal is a bin more confident than accurate."""
    ax.plot([0, 100], [0, 100], color="#888", lw=0.8, ls="--")
    for line, g in data.groupby("line"):
        ax.plot(g["x"], g["value"], marker=".", ms=4, lw=1.2, label=line, **line_look(int(g["look"].iloc[0])))
    ax.set_xlim(0, 100)
    ax.set_ylim(-2, 102)   # a bin at 0 or 100 % accuracy stays inside the frame
    ax.set_xlabel("confidence: top softmax probability (%), 15 bins")
    ax.set_ylabel("test accuracy in the bin (%)")
    ax.set_title("Reliability: under the diagonal is over-confident", y=1.0)


def draw_tuning(ax, data: pd.DataFrame) -> None:
    from matplotlib.ticker import MaxNLocator

    for study, g in data.groupby("study"):
        g = g.sort_values("number")
        dots = ax.plot(g["number"], g["objective"], ls="none", marker="o", ms=3.5, alpha=0.75, label=study)
        ax.step(g["number"], np.maximum.accumulate(g["objective"].to_numpy()), where="post", lw=1.2,
                color=dots[0].get_color())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Validation top-1 per trial (line: best so far)", y=1.0)


DRAWINGS = {PER_CLASS: (draw_per_class, 6), WEIGHT_NORMS: (draw_weight_norms, 6),
            TAU_SWEEP: (draw_tau_sweep, 4), TUNING: (draw_tuning, 3),
            RELIABILITY: (draw_reliability, 6)}   # drawing, legend columns


def plain_log_ticks(axis) -> None:
    """1-2-5 ticks labelled 50, 100, 200: LogFormatter's 10^x labels go through mathtext."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_locator(NullLocator())


def render_png(job: PlotJob) -> bytes:
    """The job's plot in matplotlib's default style, whatever a matplotlibrc says: the cache
    key names no rc settings."""
    from matplotlib import style
    from matplotlib.figure import Figure

    with style.context("default"):
        fig = Figure(dpi=DPI)
        ax = fig.add_subplot()
        draw, columns = DRAWINGS[job.kind]
        draw(ax, job.data)
        handles, labels = ax.get_legend_handles_labels()
        fig.set_size_inches(WIDTH, TOP + AXES_HEIGHT + BOTTOM)
        columns = fitting_columns(fig, handles, labels, columns)
        legend_height = LEGEND_ROW * math.ceil(len(labels) / columns)
        height = TOP + AXES_HEIGHT + BOTTOM + legend_height
        fig.set_size_inches(WIDTH, height)
        fig.subplots_adjust(left=LEFT / WIDTH, right=1 - RIGHT / WIDTH, top=1 - TOP / height,
                            bottom=(BOTTOM + legend_height) / height)
        if labels:
            fig.legend(handles, labels, loc="lower center", ncol=columns, fontsize=LEGEND_FONT, frameon=False,
                       bbox_to_anchor=(0.5, 0.06 / height))
        return png_of(fig)


def fitting_columns(fig, handles, labels, most: int) -> int:
    """The most legend columns, up to `most`, that fit across the figure: long entries (a method
    on two setups) would run off both edges. One text layout where they fit, no draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    for columns in range(min(most, len(labels)), 1, -1):
        trial = fig.legend(handles, labels, ncol=columns, fontsize=LEGEND_FONT, frameon=False)
        fits = trial.get_window_extent(renderer).width <= fig.bbox.width
        trial.remove()
        if fits:
            return columns
    return 1


def png_of(fig) -> bytes:
    """The figure as a 128-colour PNG: as sharp as RGBA for these line plots at a third of
    the bytes, and quicker to compress."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    buf = io.BytesIO()
    image.quantize(128, method=Image.Quantize.FASTOCTREE).save(buf, format="png")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


# ---------------------------------------------------------------- cache and workers

def default_cache() -> Path:
    """Beside the stage-1 checkpoints (harness.checkpoints.cache_root, which imports torch)."""
    return Path(os.environ.get("HARNESS_CACHE") or ".harness_cache") / "plots"


class PlotCache:
    """PNG files named by their job's key; a write is atomic, so a reader sees all of it or
    nothing, and an unreadable file is a miss."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def get(self, key: str) -> bytes | None:
        try:
            return (self.folder / f"{key}.png").read_bytes()
        except OSError:
            return None

    def put(self, key: str, png: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"{key}.tmp{os.getpid()}"
        tmp.write_bytes(png)
        os.replace(tmp, self.folder / f"{key}.png")

    def keep_only(self, keys: set[str]) -> None:
        """Forget the plots this report no longer shows, so the cache stays one report large."""
        for path in self.folder.glob("*.png"):
            if path.stem not in keys:
                path.unlink(missing_ok=True)


class Rendering:
    """The PNGs of named plot jobs: cached ones at once, the others drawn by worker processes
    while the caller goes on. `result()` waits for them, stores them and, when the jobs are a
    whole report's (`prune`), forgets the cached plots they do not name."""

    def __init__(self, jobs: dict, cache: PlotCache, prune: bool = True):
        self.cache, self.prune = cache, prune
        self.keys = {name: job.key() for name, job in jobs.items()}
        found = {key: cache.get(key) for key in set(self.keys.values())}
        self.pngs = {key: png for key, png in found.items() if png is not None}
        missing = {self.keys[name]: job for name, job in jobs.items() if self.keys[name] not in self.pngs}
        if missing:
            import matplotlib.figure  # noqa: F401  once here rather than in every worker
        self.pool, self.futures = start_workers(render_png, missing)

    def result(self) -> dict:
        for key, future in self.futures.items():
            self.pngs[key] = future.result()
            self.cache.put(key, self.pngs[key])
        self.pool.shutdown()
        if self.prune:
            self.cache.keep_only(set(self.keys.values()))
        return {name: self.pngs[key] for name, key in self.keys.items()}
