"""Leaderboards from the store: pandas tables -> Jinja2 (HTML), tabulate (Markdown,
terminal), CSV, LaTeX and the Papers-with-Code sota-extractor JSON.

A board is one (dataset, rho, preset): results of different presets are never
ranked together. Seeds are aggregated here, at report time (mean, sample std, n).
"""
from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import select
from tabulate import tabulate

from harness import HarnessError
from harness.config import load_benchmarks
from harness.formatting import fmt
from harness.store import ClassMetric, CurvePoint, Metric, Run, Store

GROUPS = ("all", "many", "medium", "few")
TASK = "Long-tail Learning"
METRIC_NAMES = {"top1": "Top-1 Accuracy", "error": "Error Rate"}


# ---------------------------------------------------------------- loading

def load_results(store: Store) -> pd.DataFrame:
    """One row per completed run with its test metrics as columns top1_all ... top1_few."""
    with store.engine.connect() as con:
        runs = pd.read_sql(select(Run.id, Run.method, Run.dataset, Run.rho, Run.backbone, Run.seed, Run.preset,
                                  Run.finished_at, Run.wall_seconds, Run.device, Run.git_commit, Run.extra,
                                  Run.stage1_cached).where(Run.status == "completed"), con)
        metrics = pd.read_sql(select(Metric.run_id, Metric.group, Metric.top1).where(Metric.split == "test"), con)
    if runs.empty:
        return runs
    wide = metrics.pivot_table(index="run_id", columns="group", values="top1", aggfunc="first", dropna=False)
    wide = wide.reindex(columns=list(GROUPS)).add_prefix("top1_")
    df = runs.merge(wide, left_on="id", right_index=True, how="left")
    extra = df["extra"].apply(lambda e: e if isinstance(e, dict) else json.loads(e or "{}"))
    # compute spent on this result: its own wall time plus a reused stage 1's
    reused = extra.apply(lambda e: e.get("stage1_seconds", 0.0)).where(df["stage1_cached"] == 1, 0.0)
    df["minutes"] = (df["wall_seconds"].fillna(0) + reused) / 60.0
    df["gpu"] = df["device"].str.contains("cuda|nvidia|NVIDIA|H100|A100", regex=True)
    df["finished_at"] = pd.to_datetime(df["finished_at"], utc=True)
    return df.drop(columns=["extra"])


def load_class_table(store: Store, run_ids: list[str]) -> pd.DataFrame:
    with store.engine.connect() as con:
        q = select(ClassMetric.run_id, ClassMetric.class_index, ClassMetric.class_name, ClassMetric.train_count,
                   ClassMetric.accuracy, ClassMetric.weight_norm).where(ClassMetric.run_id.in_(run_ids))
        return pd.read_sql(q, con)


def load_curves(store: Store, run_ids: list[str], kind: str) -> pd.DataFrame:
    with store.engine.connect() as con:
        q = select(CurvePoint.run_id, CurvePoint.x, CurvePoint.split, CurvePoint.group, CurvePoint.value).where(
            CurvePoint.run_id.in_(run_ids), CurvePoint.kind == kind)
        return pd.read_sql(q, con)


# ---------------------------------------------------------------- boards

@dataclass
class Board:
    dataset: str
    title: str
    rho: float
    preset: str
    metric: str                 # the benchmark's leading metric: top1 or error
    rows: pd.DataFrame          # aggregated, ranked
    references: list[dict] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)   # name -> data URI

    @property
    def slug(self) -> str:
        return slugify(f"{self.dataset}-rho{self.rho:g}-{self.preset}")

    @property
    def name(self) -> str:
        return f"{self.title} (ρ={self.rho:g})"


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (None for one seed) and n per (method, backbone), ranked by top-1."""
    rows = []
    for (method, backbone), g in runs.groupby(["method", "backbone"], sort=False):
        row = {"method": method, "backbone": backbone, "n": len(g), "seeds": sorted(g["seed"].tolist())}
        for grp in GROUPS:
            values = g[f"top1_{grp}"].dropna()
            row[f"{grp}_mean"] = float(values.mean()) if len(values) else None
            row[f"{grp}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
        row["minutes"] = float(g["minutes"].mean())
        row["gpu"] = bool(g["gpu"].any())
        row["date"] = g["finished_at"].max().strftime("%Y-%m-%d")
        row["commit"] = ", ".join(sorted({c[:7] + ("+dirty" if c.endswith("+dirty") else "")
                                          for c in g["git_commit"]}))
        rows.append(row)
    df = pd.DataFrame(rows).sort_values("all_mean", ascending=False, kind="stable").reset_index(drop=True)
    df["rank"] = np.arange(1, len(df) + 1)
    df["tie"] = [False] + [intervals_overlap(df.iloc[i - 1], df.iloc[i]) for i in range(1, len(df))]
    return df


def intervals_overlap(above: pd.Series, row: pd.Series) -> bool:
    """mean ± std intervals touch or overlap (one seed: a point interval)."""
    def interval(r):
        s = r["all_std"] if r["all_std"] is not None and not pd.isna(r["all_std"]) else 0.0
        return r["all_mean"] - s, r["all_mean"] + s
    lo_a, _ = interval(above)
    _, hi_b = interval(row)
    return hi_b >= lo_a


def references_for(doc: dict, dataset: str, rho: float) -> list[dict]:
    bench = doc["benchmarks"].get(dataset, {})
    return [r for r in bench.get("references") or [] if float(r.get("rho", 0)) == float(rho)]


def attach_deltas(rows: pd.DataFrame, refs: list[dict], preset: str) -> pd.DataFrame:
    """Paper number and Δ (ours − paper) for the same method; only the paper preset is compared."""
    paper, delta, source = [], [], []
    for _, r in rows.iterrows():
        ref = next((x for x in refs if x["method"] == r["method"]), None)
        paper.append(ref["top1"] if ref else None)
        source.append(ref["source"] if ref else None)
        delta.append(r["all_mean"] - ref["top1"] if ref and preset == "paper" and r["all_mean"] is not None else None)
    rows = rows.copy()
    rows["paper"], rows["delta"], rows["paper_source"] = paper, delta, source
    return rows


def build_boards(store: Store, benchmarks: str | None = None, plots: bool = True) -> list[Board]:
    from harness.registry import DATASETS

    doc = load_benchmarks(benchmarks)
    df = load_results(store)
    boards: list[Board] = []
    if df.empty:
        return boards
    for (dataset, rho, preset), runs in df.groupby(["dataset", "rho", "preset"], sort=True):
        bench = doc["benchmarks"].get(dataset, {})
        try:
            title = DATASETS.get(dataset).title
        except Exception:  # a dataset whose plugin is gone still has results worth showing
            title = dataset
        refs = references_for(doc, dataset, rho)
        rows = attach_deltas(aggregate(runs), refs, preset)
        board = Board(dataset, title, float(rho), preset, bench.get("metric", "top1"), rows, refs)
        if plots:
            board.plots = make_plots(store, runs)
        boards.append(board)
    order = {"paper": 0}
    boards.sort(key=lambda b: (b.dataset, -b.rho, order.get(b.preset, 1), b.preset))
    return boards


# ---------------------------------------------------------------- formatting

def fmt_mean_std(mean, std) -> str:
    return f"{fmt(mean)} ± {fmt(std)}"


def fmt_delta(delta) -> str:
    return "—" if delta is None or pd.isna(delta) else f"{delta:+.2f}"


def error_of(mean):
    return None if mean is None or pd.isna(mean) else 100.0 - mean


def fmt_minutes(row) -> str:
    return f"{row['minutes']:.1f} {'GPU' if row['gpu'] else 'CPU'}"


def board_table(board: Board) -> tuple[list[str], list[list[str]]]:
    """The board as display strings; the leading metric first."""
    lead = "Error" if board.metric == "error" else "Top-1"
    other = "Top-1" if board.metric == "error" else "Error"
    headers = ["Rank", "Method", "Backbone", lead, other, "n", "Many", "Medium", "Few", "Paper top-1", "Δ",
               "Compute (min)", "Date", "Commit"]
    rows = []
    for _, r in board.rows.iterrows():
        top1 = fmt_mean_std(r["all_mean"], r["all_std"])
        err = fmt_mean_std(error_of(r["all_mean"]), r["all_std"])
        rows.append([f"{r['rank']}{' (tie)' if r['tie'] else ''}", r["method"], r["backbone"],
                     err if board.metric == "error" else top1, top1 if board.metric == "error" else err,
                     str(r["n"]), fmt(r["many_mean"]), fmt(r["medium_mean"]), fmt(r["few_mean"]),
                     fmt(r["paper"]), fmt_delta(r["delta"]), fmt_minutes(r), r["date"], r["commit"]])
    return headers, rows


def reference_table(board: Board) -> tuple[list[str], list[list[str]]]:
    headers = ["Method (paper)", "Backbone", "Top-1", "Error", "Many", "Medium", "Few", "Source"]
    rows = [[r["method"], r.get("backbone", ""), fmt(r["top1"]), fmt(error_of(r["top1"])), fmt(r.get("many")),
             fmt(r.get("medium")), fmt(r.get("few")), r["source"]] for r in board.references]
    return headers, rows


def method_results(boards: list[Board]) -> dict[str, list[dict]]:
    """Per method, the Papers-with-Code results table: Task | Dataset | Metric | Value | Model."""
    out: dict[str, list[dict]] = {}
    for b in boards:
        for _, r in b.rows.iterrows():
            model = f"{r['method']} ({r['backbone']}, preset {b.preset}, n={r['n']})"
            for metric, value in (("error", error_of(r["all_mean"])), ("top1", r["all_mean"])):
                out.setdefault(r["method"], []).append({
                    "task": TASK, "dataset": b.name, "metric": METRIC_NAMES[metric], "value": value,
                    "model": model, "rank": int(r["rank"]), "board": b.slug, "preset": b.preset})
    return out


# ---------------------------------------------------------------- plots

def make_plots(store: Store, runs: pd.DataFrame) -> dict[str, str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = runs["id"].tolist()
    classes = load_class_table(store, ids)
    if classes.empty:
        return {}
    classes = classes.merge(runs[["id", "method"]], left_on="run_id", right_on="id")
    per_class = classes.groupby(["method", "class_index"]).agg(
        train_count=("train_count", "first"), accuracy=("accuracy", "mean"), weight_norm=("weight_norm", "mean")
    ).reset_index()
    plots = {}
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for method, g in per_class.groupby("method"):
        g = g.sort_values("train_count", ascending=False)
        ax.plot(g["train_count"], g["accuracy"], marker="o", ms=3, lw=1.2, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Per-class accuracy against training count", pad=14)
    for edge in (19.5, 100.5):  # shot-group boundaries: few < 20 <= medium <= 100 < many
        ax.axvline(edge, color="#bbb", lw=0.8, ls="--")
    for x, name in ((19.5, "few ←"), (100.5, "→ many")):
        ax.text(x, 1.0, name, transform=ax.get_xaxis_transform(), fontsize=7, color="#888", va="bottom",
                ha="right" if name.startswith("few") else "left")
    legend_below(ax)
    plots["Per-class accuracy"] = to_data_uri(fig)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for method, g in per_class.groupby("method"):
        g = g.sort_values("class_index")
        ax.plot(g["class_index"], g["weight_norm"], marker=".", ms=3, lw=1.2, label=method)
    ax.set_xlabel("class index (head → tail)")
    ax.set_ylabel("‖w_c‖ of the final classifier")
    ax.set_title("Classifier weight norm per class")
    legend_below(ax)
    plots["Classifier weight norms"] = to_data_uri(fig)
    sweep = load_curves(store, ids, "tau_sweep")
    if not sweep.empty:
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
        mean = sweep.groupby(["split", "group", "x"])["value"].mean().reset_index()
        colours = {"all": "#222", "many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}
        for (split, group), g in mean.groupby(["split", "group"]):
            ax.plot(g["x"], g["value"], lw=2.0 if group == "all" else 1.2, color=colours.get(group),
                    ls="-" if split == "test" else "--", label=f"{split} {group}")
        val_all = mean[(mean["split"] == "val") & (mean["group"] == "all")]
        if not val_all.empty:
            best = float(val_all.loc[val_all["value"].idxmax(), "x"])
            ax.axvline(best, color="#888", lw=0.8, ls=":")
            ax.text(best, 1.0, f" τ = {best:g} (val)", transform=ax.get_xaxis_transform(), fontsize=7,
                    color="#555", va="bottom")
        ax.set_xlabel("τ")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("τ-norm sweep: solid test, dashed val", pad=14)
        legend_below(ax, ncol=4)
        plots["τ sweep"] = to_data_uri(fig)
    plt.close("all")
    return plots


def legend_below(ax, ncol: int = 6) -> None:
    ax.legend(fontsize=7, ncol=ncol, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)


def to_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------- renderers

def jinja_env():
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("harness", "templates"), autoescape=select_autoescape(["html"]))
    env.filters["fmt"] = fmt
    return env


def render_html(boards: list[Board], out: Path) -> list[Path]:
    env = jinja_env()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    methods = method_results(boards)
    index = env.get_template("index.html").render(boards=boards, methods=sorted(methods), leaders=leaders(boards))
    written.append(write(out / "index.html", index))
    for b in boards:
        headers, rows = board_table(b)
        ref_headers, ref_rows = reference_table(b)
        html = env.get_template("board.html").render(board=b, headers=headers, rows=rows, ref_headers=ref_headers,
                                                     ref_rows=ref_rows, methods=sorted(methods))
        written.append(write(out / f"{b.slug}.html", html))
    for method, results in methods.items():
        html = env.get_template("method.html").render(method=method, about=method_about(method), results=results,
                                                      methods=sorted(methods))
        written.append(write(out / f"method-{slugify(method)}.html", html))
    return written


def method_about(name: str) -> dict:
    """Title and paper of a registered method; a stored method no longer installed shows its name only."""
    from harness.registry import METHODS

    try:
        method = METHODS.get(name)
    except HarnessError:
        return {"title": name, "paper": ""}
    return {"title": getattr(method, "title", name) or name, "paper": getattr(method, "paper", "")}


def leaders(boards: list[Board]) -> list[dict]:
    out = []
    for b in boards:
        top = b.rows.iloc[0]
        out.append({"board": b, "method": top["method"], "top1": top["all_mean"], "n_methods": len(b.rows),
                    "n_runs": int(b.rows["n"].sum())})
    return out


def render_markdown(boards: list[Board], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    lines = ["# Leaderboards", "", "Generated by `harness report` from the results store. "
             "Each board is one dataset, imbalance ratio and preset; presets are never ranked together. "
             "Values are mean ± sample std over seeds; \"—\" is an empty shot group or a single seed's std.", ""]
    rows = [[f"[{l['board'].name}]({l['board'].slug}.md)", l["board"].preset, l["method"], fmt(l["top1"]),
             l["n_methods"], l["n_runs"]] for l in leaders(boards)]
    lines.append(tabulate(rows, headers=["Benchmark", "Preset", "Leader", "Top-1", "Methods", "Runs"],
                          tablefmt="github", disable_numparse=True))
    lines.append("")
    for b in boards:
        text = markdown_board(b)
        written.append(write(out / f"{b.slug}.md", text))
        lines += [text, ""]
    written.insert(0, write(out / "README.md", "\n".join(lines)))
    return written


def markdown_board(b: Board) -> str:
    headers, rows = board_table(b)
    text = [f"## {TASK} on {b.name} — preset `{b.preset}`", "",
            f"Ranked by top-1 (leading metric: {METRIC_NAMES[b.metric]}). \"(tie)\": mean ± std overlaps the row above.",
            "", tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)]
    if b.references:
        rh, rr = reference_table(b)
        text += ["", "Paper-reported (reference, not measured here):", "",
                 tabulate(rr, headers=rh, tablefmt="github", disable_numparse=True)]
    return "\n".join(text) + "\n"


def render_terminal(boards: list[Board]) -> str:
    parts = []
    for b in boards:
        headers, rows = board_table(b)
        parts.append(f"{TASK} on {b.name} — preset {b.preset}\n" + tabulate(rows, headers=headers,
                                                                           disable_numparse=True))
        if b.references:
            rh, rr = reference_table(b)
            parts.append("paper-reported:\n" + tabulate(rr, headers=rh, disable_numparse=True))
    return "\n\n".join(parts) if parts else "no completed runs in the store"


def board_frame(boards: list[Board]) -> pd.DataFrame:
    """All boards as one numeric table (CSV export)."""
    frames = []
    for b in boards:
        df = b.rows.drop(columns=["seeds", "paper_source"]).copy()
        df.insert(0, "preset", b.preset)
        df.insert(0, "rho", b.rho)
        df.insert(0, "dataset", b.dataset)
        df["error_mean"] = 100.0 - df["all_mean"]
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def render_csv(boards: list[Board]) -> str:
    return board_frame(boards).to_csv(index=False)


def latex_escape(text: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", str(text)).replace("~", r"\textasciitilde{}").replace("^", r"\^{}")


def render_latex(boards: list[Board]) -> str:
    parts = []
    for b in boards:
        body = []
        for _, r in b.rows.iterrows():
            pm = "" if r["all_std"] is None or pd.isna(r["all_std"]) else f" $\\pm$ {r['all_std']:.2f}"
            body.append(" & ".join([latex_escape(r["method"]), latex_escape(r["backbone"]),
                                    f"{fmt(r['all_mean'])}{pm}", fmt(error_of(r["all_mean"])),
                                    fmt(r["many_mean"]), fmt(r["medium_mean"]), fmt(r["few_mean"]),
                                    str(r["n"])]).replace("—", "--") + r" \\")
        parts.append("\n".join([
            "\\begin{table}[t]", "\\centering",
            f"\\caption{{{latex_escape(TASK)} on {latex_escape(b.title)} ($\\rho={b.rho:g}$), preset {latex_escape(b.preset)}.}}",
            "\\begin{tabular}{llrrrrrr}", "\\toprule",
            "Method & Backbone & Top-1 & Error & Many & Medium & Few & $n$ \\\\", "\\midrule",
            *body, "\\bottomrule", "\\end{tabular}", "\\end{table}"]))
    return "\n\n".join(parts) + "\n"


def render_pwc_json(boards: list[Board]) -> str:
    """The shape of paperswithcode/sota-extractor's evaluation tables:
    task -> datasets -> sota -> rows with metrics."""
    datasets = []
    for b in boards:
        rows = [{"model_name": r["method"], "paper_title": "", "paper_url": "", "paper_date": None,
                 "code_links": [], "model_links": [], "uses_additional_data": False,
                 "metrics": {"Top-1 Accuracy": fmt(r["all_mean"]), "Error Rate": fmt(error_of(r["all_mean"]))}}
                for _, r in b.rows.iterrows()]
        datasets.append({"dataset": f"{b.name} [{b.preset}]", "description": "", "dataset_links": [],
                         "subdatasets": [], "dataset_citations": [],
                         "sota": {"metrics": [METRIC_NAMES[b.metric],
                                              METRIC_NAMES["top1" if b.metric == "error" else "error"]],
                                  "rows": rows}})
    task = {"task": TASK, "description": "", "categories": ["Computer Vision"], "datasets": datasets,
            "subtasks": [], "synonyms": [], "source_link": None}
    return json.dumps([task], indent=2, ensure_ascii=False)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
