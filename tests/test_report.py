"""Reports from a store of known rows: ranks, mean ± std, ties, Δ against references of the same
protocol, escaping, empty groups, tuning studies, the plot cache."""
import csv
import io
import json
import shutil
import statistics
import subprocess

import numpy as np
import pandas as pd
import pytest
import yaml

from harness import HarnessError
from harness import report as rep
from harness.report_plots import PER_CLASS, RELIABILITY, TUNING, WEIGHT_NORMS
from harness.report_protocol import Reference, compare, differences
from harness.store import Run, Store, now

LDAM = {"backbone": "resnet32", "generator": "ldam", "epochs": 200, "augmentation": "crop+flip",
        "framework": "pytorch", "selection": "best-test"}
WB_CODE = {"backbone": "resnet34-cifar", "generator": "first", "epochs": 200, "augmentation": "crop+flip",
           "framework": "pytorch", "selection": "best-test", "tta": "flip"}
BENCH = {
    "version": 1,
    "benchmarks": {
        "cifar10-lt": {
            "rhos": [10], "backbone": "resnet32", "metric": "error", "presets": {"paper": {}, "quick": {}},
            "methods": {}, "references": [
                {"method": "ce", "rho": 10, "top1": 86.0, "protocol": LDAM, "source": "Some paper, Table 1"},
                {"method": "ce", "rho": 10, "top1": 80.0, "protocol": LDAM, "source": "A later copy"},
                {"method": "wb", "rho": 10, "top1": 66.0, "protocol": WB_CODE, "variant": "stage 1 only (WD)",
                 "source": "WB, Table 2"},
                {"method": "wb", "rho": 10, "top1": 68.67, "protocol": WB_CODE, "source": "WB, Table 2 (WD & MaxNorm)"},
                {"method": "lws", "rho": 10, "top1": 75.0, "protocol": LDAM, "variant": "τ = 1",
                 "source": "A variant"},
                {"method": "ce", "rho": 50, "top1": 1.0, "protocol": LDAM, "source": "another ratio"},
            ],
        }
    },
}
PAPER_RECIPE = {"recipe": {"stage1": {"epochs": 200}}}   # no augmentation recorded: crop+flip
QUICK_RECIPE = {"recipe": {"stage1": {"epochs": 10, "paper_epochs": 200}, "augmentation": "crop+flip"}}

EVIL = "<script>alert(1)</script>"


def add_run(store, run_id, method, seed, top1, preset="paper", groups=None, device="cpu (2 threads)",
            config=None, study=None, extra=None, val_top1=None, backbone="resnet32", curves=(),
            dataset="cifar10-lt", rho=10.0, ece=None):
    groups = groups or {"many": top1 + 5, "medium": None, "few": None}  # CIFAR-10-LT rho 10: all many
    config = config or (QUICK_RECIPE if preset == "quick" else PAPER_RECIPE)
    store.start_run(Run(id=run_id, method=method, dataset=dataset, rho=rho, backbone=backbone, seed=seed,
                        generator="ldam", preset=preset, config=config, config_hash=run_id, status="running",
                        started_at=now(), device=device, git_commit="abcdef1234", versions={},
                        data_checksum="x", extra={}, study=study))
    metrics = [{"split": "test", "group": "all", "top1": top1, "error": 100 - top1, "ece": ece, "n_classes": 10}]
    metrics += [{"split": "test", "group": g, "top1": v, "error": None if v is None else 100 - v, "n_classes": 10}
                for g, v in groups.items()]
    if val_top1 is not None:
        metrics.append({"split": "val", "group": "all", "top1": val_top1, "error": 100 - val_top1, "n_classes": 10})
    classes = [{"class_index": c, "class_name": f"k{c}", "train_count": 5000 // (c + 1), "accuracy": top1,
                "weight_norm": 1.0 + c} for c in range(10)]
    store.complete_run(run_id, metrics=metrics, class_metrics=classes, curves=list(curves), extra=extra or {},
                       wall_seconds=120.0, stage1_cached=False)


@pytest.fixture
def bench(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(BENCH, allow_unicode=True))
    return str(path)


@pytest.fixture
def boards(tmp_path, bench):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    for seed, v in enumerate([88.0, 90.0, 89.0]):
        add_run(store, f"ce{seed}", "ce", seed, v)
    for seed, v in enumerate([91.0, 93.0]):
        add_run(store, f"wb{seed}", "wb", seed, v)
    add_run(store, "lws0", "lws", 0, 70.0)
    add_run(store, "evil", EVIL, 0, 50.0)
    add_run(store, "q0", "ce", 0, 99.0, preset="quick")   # higher, but a different preset
    add_run(store, "failed", "ce", 5, 0.0)
    with store.session() as s, s.begin():
        s.get(Run, "failed").status = "failed"
    return rep.build_boards(store, bench, plot_cache=tmp_path / "plots"), store, bench


def row_of(headers, rows, method):
    return dict(zip(headers, next(r for r in rows if r[1] == method)))


def test_presets_are_separate_boards(boards):
    bs, _, _ = boards
    assert [(b.dataset, b.rho, b.preset) for b in bs] == [("cifar10-lt", 10.0, "paper"), ("cifar10-lt", 10.0, "quick")]
    assert bs[1].rows["method"].tolist() == ["ce"]


def test_ranks_mean_std_n_and_ties(boards):
    paper = boards[0][0]
    rows = paper.rows.set_index("method")
    assert paper.rows["method"].tolist() == ["wb", "ce", "lws", EVIL]
    assert rows.loc["ce", "all_mean"] == pytest.approx(89.0)
    assert rows.loc["ce", "all_std"] == pytest.approx(statistics.stdev([88.0, 90.0, 89.0]))
    assert rows.loc["ce", "n"] == 3 and rows.loc["wb", "n"] == 2
    assert pd.isna(rows.loc["lws", "all_std"])  # one seed: no std
    # wb 92 ± 1.41 = [90.59, 93.41]; ce 89 ± 1 = [88, 90]: no overlap. lws 70 is far below.
    assert paper.rows["tie"].tolist() == [False, False, False, False]


def test_overlapping_intervals_are_ties(tmp_path, bench):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    for seed, v in enumerate([80.0, 84.0]):
        add_run(store, f"a{seed}", "a", seed, v)   # 82 ± 2.83
    for seed, v in enumerate([79.0, 81.0]):
        add_run(store, f"b{seed}", "b", seed, v)   # 80 ± 1.41: overlaps [79.17, 84.83]
    add_run(store, "c0", "c", 0, 60.0)
    [board] = rep.build_boards(store, bench, plots=False)
    assert board.rows["tie"].tolist() == [False, True, False]
    headers, rows = rep.board_table(board)
    assert rows[1][0] == "2 (tie)"


def test_delta_against_the_first_reference_of_our_protocol_with_other_differences_named(boards):
    paper = boards[0][0]
    headers, rows = rep.board_table(paper)
    assert headers[3] == "Error" and headers[4] == "Top-1"   # CIFAR-LT leads with error, as PwC did
    ce = row_of(headers, rows, "CE")
    assert ce["Error"] == "11.00 ± 1.00" and ce["Top-1"] == "89.00 ± 1.00"
    # two comparable ce references: the first in file order (86.0, not 80.0)
    assert ce["Paper top-1"] == "86.00" and ce["Δ"] == "+3.00"
    assert ce["Paper differs"] == "selection"
    row = paper.rows.set_index("method").loc["ce"]
    assert [str(d) for d in row["paper_differs"]] == ["selection best-test (ours last)"]
    assert row["paper_source"] == "Some paper, Table 1"


def test_no_delta_across_backbones(boards):
    """A ResNet-32 run is not compared with WB's ResNet-34 number; the plain reference is shown
    (not the variant listed first) with its differences named."""
    paper = boards[0][0]
    headers, rows = rep.board_table(paper)
    wb = row_of(headers, rows, "WB")
    assert wb["Δ"] == "—" and wb["Paper top-1"] == "68.67"
    assert wb["Paper differs"] == "backbone, generator, selection, tta"
    row = paper.rows.set_index("method").loc["wb"]
    assert pd.isna(row["delta"])
    assert [str(d) for d in row["paper_differs"]][:2] == ["backbone resnet34-cifar (ours resnet32)",
                                                          "generator first (ours ldam)"]


def test_a_variant_never_gives_delta(boards):
    paper = boards[0][0]
    headers, rows = rep.board_table(paper)
    lws = row_of(headers, rows, "LWS")
    assert lws["Δ"] == "—" and lws["Paper top-1"] == "75.00"   # same protocol, but a variant of lws
    assert lws["Paper differs"].startswith("variant")
    assert str(paper.rows.set_index("method").loc["lws", "paper_differs"][0]) == "variant: τ = 1"


def test_quick_runs_are_not_compared_and_name_their_epochs(boards):
    quick = boards[0][1]
    headers, rows = rep.board_table(quick)
    assert rows[0][headers.index("Δ")] == "—"
    assert "epochs 200 (ours 10)" in [str(d) for d in quick.rows.loc[0, "paper_differs"]]


def test_reference_table_lists_every_reference_of_the_ratio_with_its_differences(boards):
    paper = boards[0][0]
    headers, rows = rep.reference_table(paper)
    assert [r[0] for r in rows] == ["CE", "CE", "WB", "WB", "LWS"]   # not the rho-50 one
    table = [dict(zip(headers, r)) for r in rows]
    assert table[0]["Differs from ours"] == "selection best-test (ours last)"
    assert table[2]["Variant"] == "stage 1 only (WD)"
    assert table[3]["Differs from ours"].startswith("backbone resnet34-cifar (ours resnet32); generator first")
    assert table[3]["Protocol"] == "resnet34-cifar · first · 200 ep · crop+flip · pytorch · best-test · TTA flip"


def test_rows_split_by_setup_and_each_meets_the_references_of_its_own(tmp_path, bench):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    add_run(store, "plain", "ce", 0, 88.0)
    add_run(store, "autoaug", "ce", 0, 90.0,
            config={"recipe": {"stage1": {"epochs": 200}, "augmentation": "crop+flip+autoaugment"}})
    add_run(store, "unrecorded", "ce", 1, 87.0, config={"recipe": {}})
    [board] = rep.build_boards(store, bench, plots=False)
    headers, rows = rep.board_table(board)
    table = {r[headers.index("Setup")]: dict(zip(headers, r)) for r in rows}
    assert set(table) == {"resnet32 · epochs 200 · augmentation crop+flip+autoaugment",
                          "resnet32 · epochs 200 · augmentation crop+flip", "resnet32 · epochs — · augmentation crop+flip"}
    assert table["resnet32 · epochs 200 · augmentation crop+flip"]["Δ"] == "+2.00"
    assert table["resnet32 · epochs 200 · augmentation crop+flip+autoaugment"]["Δ"] == "—"
    assert table["resnet32 · epochs 200 · augmentation crop+flip+autoaugment"]["Paper differs"] == "augmentation, selection"
    unrecorded = next(r for _, r in board.rows.iterrows() if r["epochs"] is None)
    assert str(unrecorded["paper_differs"][0]) == "epochs 200 (ours —)"    # no Δ on what nothing says matches
    assert pd.isna(unrecorded["delta"])


def test_protocol_rules():
    ours = {"backbone": "resnet32", "generator": "ldam", "epochs": 200, "augmentation": "crop+flip",
            "framework": "pytorch", "selection": "last", "tta": "none", "precision": "fp32", "runs": 3}
    mean_of_5 = Reference("ce", 100, 70.0, "LA", protocol={**LDAM, "selection": "last", "runs": 5})
    assert [str(d) for d in differences(mean_of_5, ours)] == ["runs 5 (ours 3)"]
    # a reference states no precision: fp32, as every official code; bf16 is named, and Δ stays
    on_gpu = {**ours, "precision": "bf16"}
    assert [str(d) for d in differences(mean_of_5, on_gpu)] == ["runs 5 (ours 3)", "precision fp32 (ours bf16)"]
    assert compare(on_gpu, 72.0, [mean_of_5], with_delta=True).delta == pytest.approx(2.0)
    unstated = Reference("ce", 100, 70.0, "old", protocol={"backbone": "resnet32"})
    assert compare(ours, 72.0, [unstated], with_delta=True).delta is None   # nothing says it matches
    autoaugment = Reference("ce", 100, 70.0, "BALMS", protocol={**LDAM, "augmentation": "crop+flip+autoaugment"})
    assert [d.name for d in differences(autoaugment, ours)] == ["augmentation", "selection"]
    assert compare(ours, 72.0, [autoaugment, mean_of_5], with_delta=True).delta == pytest.approx(2.0)


def test_differences_in_every_format(boards, tmp_path):
    bs, _, _ = boards
    md = (tmp_path / "md")
    rep.render_markdown(bs, md)
    board_md = (md / "cifar10-lt-rho10-paper.md").read_text()
    assert "| Paper differs" in board_md and "backbone, generator, selection, tta" in board_md
    assert "backbone resnet34-cifar (ours resnet32); generator first (ours ldam)" in board_md
    terminal = rep.render_terminal(bs)
    assert "Paper differs" in terminal and "selection best-test (ours last)" in terminal
    table = list(csv.DictReader(io.StringIO(rep.render_csv(bs))))
    ce = next(r for r in table if r["method"] == "ce" and r["preset"] == "paper")
    assert ce["label"] == "CE" and float(ce["paper"]) == 86.0 and float(ce["delta"]) == pytest.approx(3.0)
    assert ce["paper_differs"] == "selection best-test (ours last)"
    wb = next(r for r in table if r["method"] == "wb")
    assert wb["delta"] == "" and wb["paper_differs"].startswith("backbone resnet34-cifar (ours resnet32)")
    tex = rep.render_latex(bs)
    assert "86.00\\textsuperscript{a}" in tex and "CE: selection best-test (ours last)." in tex
    pwc = json.loads(rep.render_pwc_json(bs))[0]["datasets"][0]["sota"]["rows"]
    ce_ref = next(r for r in pwc if r["model_name"] == "CE")["paper_reference"]
    assert ce_ref == {"top1": 86.0, "delta": 3.0, "source": "Some paper, Table 1",
                      "differs": ["selection best-test (ours last)"]}


def test_html_shows_differences_compactly_with_details(boards, tmp_path):
    rep.render_html(boards[0], tmp_path / "site")
    page = (tmp_path / "site" / "cifar10-lt-rho10-paper.html").read_text()
    assert '<span title="selection best-test (ours last)">selection</span>' in page
    assert "stage 1 only (WD)" in page and "WB, Table 2 (WD &amp; MaxNorm)" in page


def test_empty_groups_render_as_dash_not_zero(boards):
    headers, rows = rep.board_table(boards[0][0])
    wb = row_of(headers, rows, "WB")
    assert wb["Many"] == "97.00"
    assert wb["Medium"] == "—" and wb["Few"] == "—"


def test_html_escapes_and_is_self_contained(boards, tmp_path):
    bs, _, _ = boards
    files = rep.render_html(bs, tmp_path / "site")
    names = {f.name for f in files}
    assert {"index.html", "cifar10-lt-rho10-paper.html", "cifar10-lt-rho10-quick.html", "method-ce.html"} <= names
    page = (tmp_path / "site" / "cifar10-lt-rho10-paper.html").read_text()
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "http://" not in page and "https://" not in page  # no CDN, no network
    assert 'class="ref"' in page and "Some paper, Table 1" in page
    assert page.count("data:image/png;base64,") == 2  # per-class accuracy and weight norms, embedded
    assert "—" in page
    for f in files:
        assert "<script>alert" not in f.read_text()


def test_method_page_is_a_pwc_results_table(boards, tmp_path):
    rep.render_html(boards[0], tmp_path / "site")
    page = (tmp_path / "site" / "method-ce.html").read_text()
    assert "<th>Task</th><th>Dataset</th><th>Metric</th><th>Value</th>" in page
    assert "Error Rate" in page and "Top-1 Accuracy" in page and "11.00" in page


def test_markdown(boards, tmp_path):
    files = rep.render_markdown(boards[0], tmp_path / "md")
    readme = (tmp_path / "md" / "README.md").read_text()
    assert files[0].name == "README.md" and "| Benchmark" in readme
    assert "[CIFAR-10-LT (ρ=10)](cifar10-lt-rho10-paper.md)" in readme
    assert "| WB " in readme   # the leader, by its label


def test_csv_holds_numbers(boards):
    text = rep.render_csv(boards[0])
    rows = list(csv.DictReader(io.StringIO(text)))
    ce = next(r for r in rows if r["method"] == "ce" and r["preset"] == "paper")
    assert float(ce["all_mean"]) == pytest.approx(89.0) and float(ce["error_mean"]) == pytest.approx(11.0)
    assert ce["medium_mean"] == ""  # empty group is empty, not 0
    assert (ce["backbone"], ce["generator"], ce["epochs"], ce["augmentation"]) == ("resnet32", "ldam", "200",
                                                                                   "crop+flip")


def test_latex_escapes(boards):
    tex = rep.render_latex(boards[0])
    assert "\\begin{tabular}" in tex and "89.00 $\\pm$ 1.00" in tex
    assert rep.latex_escape("tau_norm & 5% ~x^2") == "tau\\_norm \\& 5\\% \\textasciitilde{}x\\^{}2"
    assert rep.latex_escape("γ = 1, β 0.9999, λ ± 0.5 − Δ — é") == \
        "$\\gamma$ = 1, $\\beta$ 0.9999, $\\lambda$ $\\pm$ 0.5 $-$ $\\Delta$ --- é"


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="needs pdflatex (Debian: texlive-latex-recommended)")
def test_latex_boards_compile_under_pdflatex(boards, store_url, tmp_path):
    store = Store(store_url)   # a τ chosen on test is named in the Setup: Greek, for pdflatex
    add_run(store, "oracle", "tau_norm", 0, 86.0, extra={"tau_selected_on": "test"})
    add_run(store, "calibrated", "ce", 0, 86.0, ece=7.5)   # a board with an ECE column: one more
    (tmp_path / "boards.tex").write_text(rep.render_latex(boards[0]) + rep.render_latex(rep.build_boards(store, None)))
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\\usepackage{booktabs}\\usepackage[landscape]{geometry}"
                                      "\\begin{document}\\input{boards}\\end{document}\n")
    made = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, [line for line in made.stdout.splitlines() if line.startswith("!")]


def test_latex_note_marks_run_past_z():
    assert [rep.note_mark(i) for i in (0, 25, 26, 27, 701, 702)] == ["a", "z", "aa", "ab", "zz", "aaa"]


def test_pwc_json_shape(boards):
    doc = json.loads(rep.render_pwc_json(boards[0]))
    task = doc[0]
    assert task["task"] == "Long-tail Learning"
    ds = task["datasets"][0]
    assert ds["sota"]["metrics"][0] == "Error Rate"
    assert ds["sota"]["rows"][0]["model_name"] == "WB"
    assert ds["sota"]["rows"][0]["paper_title"] == "Alshammari et al., Long-Tailed Recognition via Weight Balancing, CVPR 2022"
    assert set(ds["sota"]["rows"][0]["metrics"]) == {"Top-1 Accuracy", "Error Rate"}


def test_two_image_folders_at_one_ratio_are_two_boards_named_by_their_folders(tmp_path, bench):
    """folder-lt is whatever folder a run read: before, every folder at a ratio was ranked on one board."""
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    for run_id, seed, top1, folder in [("b0", 0, 60.0, "birds 1a2b3c4d"), ("b1", 1, 62.0, "birds 1a2b3c4d"),
                                       ("c0", 0, 30.0, "cars 5e6f7a8b")]:
        add_run(store, run_id, "ce", seed, top1, dataset="folder-lt", rho=100.0, extra={"data_name": folder})
    boards = rep.build_boards(store, bench, plot_cache=tmp_path / "plots")
    assert {b.name: b.rows["all_mean"].tolist() for b in boards} == {
        "Image folder (LT): birds 1a2b3c4d (ρ=100)": [61.0], "Image folder (LT): cars 5e6f7a8b (ρ=100)": [30.0]}
    assert [b.slug for b in boards] == ["folder-lt-birds-1a2b3c4d-rho100-paper", "folder-lt-cars-5e6f7a8b-rho100-paper"]
    assert all(PER_CLASS in b.plots for b in boards)
    table = list(csv.DictReader(io.StringIO(rep.render_csv(boards))))
    assert [(r["data"], r["all_mean"]) for r in table] == [("birds 1a2b3c4d", "61.0"), ("cars 5e6f7a8b", "30.0")]
    with pytest.raises(HarnessError, match=r"pass one of the store's: folder-lt \(birds 1a2b3c4d\) ρ=100 paper, "
                                           r"folder-lt \(cars 5e6f7a8b\) ρ=100 paper"):
        rep.build_boards(store, bench, plots=False, only=rep.Selection(rhos=(50.0,)))


def test_a_selection_ranks_only_its_boards_and_draws_only_their_plots(boards, tmp_path):
    _, store, bench = boards
    add_run(store, "far", "ce", 0, 40.0, rho=112 / 3)         # a natural ratio: 37.3333 on the board
    add_run(store, "other", "ce", 0, 60.0, dataset="fmnist-lt")
    keys = lambda bs: [b.key for b in bs]
    assert keys(rep.build_boards(store, bench, plots=False, only=rep.Selection(presets=("quick",)))) == \
        [("cifar10-lt", "", 10.0, "quick")]
    [natural] = rep.build_boards(store, bench, plot_cache=tmp_path / "plots", only=rep.Selection(rhos=(37.3333,)))
    assert natural.rows["all_mean"].tolist() == [40.0] and set(natural.plots) == {PER_CLASS, WEIGHT_NORMS}
    both = rep.Selection(datasets=("cifar10-lt", "fmnist-lt"), rhos=(10.0,), presets=("paper",))
    assert keys(rep.build_boards(store, bench, plots=False, only=both)) == \
        [("cifar10-lt", "", 10.0, "paper"), ("fmnist-lt", "", 10.0, "paper")]
    cached = len(list((tmp_path / "plots").glob("*.png")))
    rendering = rep.start_plots(store, {}, rep.PlotCache(tmp_path / "plots"), rep.load_titles(store).labels,
                                both)
    assert {key for key, _ in rendering.keys} == {("cifar10-lt", "", 10.0, "paper"), ("fmnist-lt", "", 10.0, "paper")}
    rendering.result()
    # one plot more (fmnist-lt's per-class accuracy), none pruned: the unselected boards' stay cached
    assert len(list((tmp_path / "plots").glob("*.png"))) == cached + 1
    with pytest.raises(HarnessError, match=r"no board matches --dataset cifar100-lt --rho 10; pass one of the "
                                           r"store's: cifar10-lt ρ=37.3333 paper, cifar10-lt ρ=10 paper, "
                                           r"cifar10-lt ρ=10 quick, fmnist-lt ρ=10 paper"):
        rep.build_boards(store, bench, plots=False, only=rep.Selection(datasets=("cifar100-lt",), rhos=(10.0,)))


def test_a_site_removes_the_pages_it_wrote_that_it_no_longer_shows_and_nothing_else(boards, tmp_path):
    bs, store, bench = boards
    site = tmp_path / "site"
    site.mkdir()
    (site / "notes.html").write_text("mine")
    written, removed = rep.render_site(bs, site)
    assert removed == [] and "cifar10-lt-rho10-quick.html" in {p.name for p in written}
    with store.session() as s, s.begin():   # the quick board's only run deleted
        s.delete(s.get(Run, "q0"))
    paper_only = rep.build_boards(store, bench, plots=False)
    _, removed = rep.render_site(paper_only, site, html=False)   # Markdown alone: the HTML stays
    assert [p.name for p in removed] == ["cifar10-lt-rho10-quick.md"]
    assert (site / "cifar10-lt-rho10-quick.html").exists()
    _, removed = rep.render_site(paper_only, site)
    assert [p.name for p in removed] == ["cifar10-lt-rho10-quick.html"]
    assert (site / "notes.html").read_text() == "mine" and (site / "method-ce.html").exists()
    assert sorted(p.name for p in site.iterdir()) == sorted(
        ["notes.html", rep.SITE_RECORD, *(site / rep.SITE_RECORD).read_text().split()])


def test_ece_is_shown_where_every_seed_of_a_row_measured_it_and_only_on_boards_that_have_it(tmp_path, bench):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    for seed, (top1, ece) in enumerate([(88.0, 10.0), (90.0, 14.0)]):
        add_run(store, f"ce{seed}", "ce", seed, top1, ece=ece)
    add_run(store, "wb0", "wb", 0, 91.0, ece=5.0)
    add_run(store, "wb1", "wb", 1, 93.0)              # stored before ECE was measured
    add_run(store, "q0", "ce", 0, 99.0, preset="quick")
    paper, quick = rep.build_boards(store, bench, plots=False)
    headers, rows = rep.board_table(paper)
    assert headers[8:11] == ["Few", "ECE", "Paper top-1"]
    assert row_of(headers, rows, "CE")["ECE"] == "12.00 ± 2.83" and row_of(headers, rows, "WB")["ECE"] == "—"
    assert "ECE" not in rep.board_table(quick)[0]
    frame = rep.board_frame([paper, quick]).set_index(["preset", "method"])
    assert frame.loc[("paper", "ce"), "ece_mean"] == pytest.approx(12.0)
    assert frame[["ece_mean"]].isna().sum().item() == 2
    tex_paper, tex_quick = rep.render_latex([paper, quick]).split("\\end{table}")[:2]
    assert "& Few & ECE & $n$ &" in tex_paper and "& 12.00 $\\pm$ 2.83 & 2 &" in tex_paper and "ECE" not in tex_quick
    assert "& 97.00 & -- & -- & -- & 2 &" in tex_paper   # wb: medium, few, ECE empty (not ---)
    pwc = json.loads(rep.render_pwc_json([paper]))[0]["datasets"][0]["sota"]
    assert pwc["metrics"][-1] == "ECE" and {r["model_name"]: r["metrics"].get("ECE") for r in pwc["rows"]} == \
        {"CE": "12.00", "WB": None}
    ce_page = [(r["dataset"], r["metric"], r["value"]) for r in rep.method_results([paper, quick])["ce"]]
    assert ("CIFAR-10-LT (ρ=10)", "ECE", 12.0) in ce_page and sum(m == "ECE" for _, m, _ in ce_page) == 1
    assert "ECE: expected calibration error" in rep.markdown_board(paper)
    assert "ECE" not in rep.markdown_board(quick)


def test_a_papers_ece_is_shown_beside_its_top1_where_it_reports_one(tmp_path):
    doc = json.loads(json.dumps(BENCH))
    refs = doc["benchmarks"]["cifar10-lt"]["references"]
    refs.insert(0, {"method": "mislas", "rho": 10, "top1": 90.0, "ece": 1.2, "protocol": LDAM, "source": "MiSLAS"})
    refs.insert(1, {"method": "mislas", "rho": 10, "top1": 87.6, "ece": 11.9, "protocol": LDAM,
                    "variant": "stage 1 only (mixup)", "source": "MiSLAS"})
    bench = tmp_path / "b.yaml"
    bench.write_text(yaml.safe_dump(doc, allow_unicode=True))
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    add_run(store, "m0", "mislas", 0, 89.0, ece=3.0)
    add_run(store, "c0", "ce", 0, 88.0, ece=9.0)
    add_run(store, "q0", "ce", 0, 80.0, preset="quick")
    paper, quick = rep.build_boards(store, str(bench), plots=False)
    headers, rows = rep.board_table(paper)
    assert headers[9:13] == ["ECE", "Paper top-1", "Paper ECE", "Δ"]
    assert row_of(headers, rows, "MiSLAS")["Paper ECE"] == "1.20"   # the compared reference's, not stage 1's
    assert row_of(headers, rows, "CE")["Paper ECE"] == "—"
    assert "Paper ECE" not in rep.board_table(quick)[0]            # no reference of ce reports one
    assert "Paper ECE: the calibration error" in rep.markdown_board(paper)
    assert "Paper ECE" not in rep.markdown_board(quick)
    ref_headers, ref_rows = rep.reference_table(paper)
    assert [dict(zip(ref_headers, r))["ECE"] for r in ref_rows][:3] == ["1.20", "11.90", "—"]
    plain = tmp_path / "plain.yaml"   # references without an ECE: no column for one
    plain.write_text(yaml.safe_dump(BENCH, allow_unicode=True))
    assert "ECE" not in rep.reference_table(rep.build_boards(store, str(plain), plots=False)[0])[0]
    tex = rep.render_latex([paper]).splitlines()
    header = next(line for line in tex if line.startswith("Method & Setup"))
    assert "& Paper & Paper ECE & $\\Delta$" in header
    mislas = next(line for line in tex if line.startswith("MiSLAS &"))
    assert mislas.count("&") == header.count("&") and mislas.endswith("& 90.00\\textsuperscript{a} & 1.20 & -1.00 \\\\")
    pwc = json.loads(rep.render_pwc_json([paper]))[0]["datasets"][0]["sota"]["rows"]
    assert {r["model_name"]: r["paper_reference"].get("ece") for r in pwc} == {"MiSLAS": 1.2, "CE": None}
    assert rep.board_frame([paper]).set_index("method").loc["mislas", "paper_ece"] == 1.2


def test_failed_runs_are_not_reported(boards):
    bs, _, _ = boards
    assert all(r != 0.0 for b in bs for r in b.rows["all_mean"])


def test_empty_store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'e.db'}")
    assert rep.build_boards(store) == []
    assert rep.render_terminal([]) == "no completed runs in the store"


def test_loading_reads_the_recipe_and_skips_trials_on_every_backend(store_url, bench):
    """The SQL (JSON paths into config and extra, the shot-group pivot) on SQLite and PostgreSQL."""
    store = Store(store_url)
    add_run(store, "quick0", "ce", 0, 60.0, preset="quick", groups={"many": 70.0, "medium": 50.0, "few": None})
    add_run(store, "paper0", "ce", 0, 80.0)
    add_run(store, "trial0", "wb", 0, 90.0, study="wb-c10-study", val_top1=55.0, extra={"trial": {"number": 7}})
    add_run(store, "tuned0", "wb", 0, 85.0, preset="quick-tuned", extra=TUNING_EXTRA)
    results = rep.load_results(store).set_index("id")
    assert sorted(results.index) == ["paper0", "quick0", "tuned0"]
    quick = results.loc["quick0"]
    assert (quick["epochs"], quick["augmentation"]) == (10, "crop+flip")
    assert results.loc["paper0", "augmentation"] == "crop+flip"    # not recorded: the default
    assert (quick["top1_all"], quick["top1_many"], quick["top1_medium"]) == (60.0, 70.0, 50.0)
    assert pd.isna(quick["top1_few"])
    [study] = rep.load_studies(store)[("cifar10-lt", "", 10.0, "quick-tuned")]   # a quick budget's tuned runs
    assert study.chosen == {"lr": 0.02, "weight_decay": 0.005} and study.trials.values.tolist() == [[7, 55.0]]


# ---------------------------------------------------------------- tuning

TUNING_EXTRA = {"tuning": {"study": "wb-c10-study", "objective": "val top-1", "n_trials": 4, "n_pruned": 2,
                           "space": {"lr": "log-uniform 1e-3 .. 1e-1", "weight_decay": "log-uniform 1e-4 .. 1e-2"},
                           "chosen": {"lr": 0.02, "weight_decay": 0.005}}}


@pytest.fixture
def tuned(tmp_path, bench):
    """A study of three completed trials and one failed, and the chosen setting retrained on two seeds."""
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    for number, objective in enumerate([61.0, 58.0, 64.0]):
        add_run(store, f"t{number}", "wb", 0, 99.0, study="wb-c10-study", val_top1=objective,
                extra={"trial": {"number": number, "params": {"lr": 0.01 * (number + 1)}}})
    add_run(store, "t3", "wb", 0, 99.0, study="wb-c10-study", val_top1=70.0, extra={"trial": {"number": 3}})
    with store.session() as s, s.begin():
        s.get(Run, "t3").status = "failed"
    for seed in (0, 1):
        add_run(store, f"chosen{seed}", "wb", seed, 80.0 + seed, preset="tuned", extra=TUNING_EXTRA)
    add_run(store, "ce0", "ce", 0, 75.0)
    return store


def test_trials_are_never_ranked(tuned, bench, tmp_path):
    boards = {b.preset: b for b in rep.build_boards(tuned, bench, plot_cache=tmp_path / "plots")}
    assert set(boards) == {"paper", "tuned"}          # the trials' 99 % is on no board
    assert boards["paper"].rows["method"].tolist() == ["ce"]
    assert boards["tuned"].rows[["method", "n"]].values.tolist() == [["wb", 2]]
    assert list(boards["paper"].plots) == [PER_CLASS, WEIGHT_NORMS]


def test_tuned_board_shows_the_search(tuned, bench, tmp_path):
    board = next(b for b in rep.build_boards(tuned, bench, plot_cache=tmp_path / "plots") if b.preset == "tuned")
    [study] = board.studies
    assert (study.method, study.name, study.n_trials) == ("wb", "wb-c10-study", 4)
    assert study.trials.values.tolist() == [[0, 61.0], [1, 58.0], [2, 64.0]]   # the failed trial is left out
    assert list(board.plots) == [PER_CLASS, WEIGHT_NORMS, TUNING]
    headers, rows = rep.tuning_table(board)
    assert dict(zip(headers, rows[0])) == {
        "Method": "WB", "Study": "wb-c10-study", "Objective": "val top-1", "Trials": "3 of 4 (+2 pruned)",
        "Search space": "lr: log-uniform 1e-3 .. 1e-1; weight_decay: log-uniform 1e-4 .. 1e-2",
        "Chosen": "lr = 0.02, weight_decay = 0.005"}
    rep.render_html([board], tmp_path / "site")
    page = (tmp_path / "site" / f"{board.slug}.html").read_text()
    assert "Hyper-parameter search" in page and "lr = 0.02, weight_decay = 0.005" in page
    assert page.count("data:image/png;base64,") == 3
    rep.render_markdown([board], tmp_path / "md")
    assert "| wb-c10-study" in (tmp_path / "md" / f"{board.slug}.md").read_text()


def test_a_search_whose_setting_was_retrained_after_another_is_not_behind_the_board(tuned, bench, tmp_path):
    later = {"tuning": {**TUNING_EXTRA["tuning"], "study": "wb-c10-again", "chosen": {"lr": 0.05}}}
    add_run(tuned, "again0", "wb", 0, 82.0, study="wb-c10-again", val_top1=66.0, extra={"trial": {"number": 0}})
    for seed in (0, 1):   # the same seeds and setup, retrained with the second search's choice
        add_run(tuned, f"rechosen{seed}", "wb", seed, 90.0, preset="tuned", extra=later)
    board = next(b for b in rep.build_boards(tuned, bench, plots=False) if b.preset == "tuned")
    assert board.rows[["method", "n", "all_mean"]].values.tolist() == [["wb", 2, 90.0]]
    assert [(s.name, s.chosen) for s in board.studies] == [("wb-c10-again", {"lr": 0.05})]


# ---------------------------------------------------------------- plot cache

def plot_files(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}


def test_plot_cache_serves_unchanged_plots_and_never_stale_ones(tmp_path, bench):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    add_run(store, "ce0", "ce", 0, 80.0)
    add_run(store, "q0", "ce", 0, 60.0, preset="quick")
    cache = tmp_path / "plots"
    first = {b.preset: b.plots for b in rep.build_boards(store, bench, plot_cache=cache)}
    files = plot_files(cache)
    assert len(files) == 3     # the two boards' weight-norm plots are one picture, stored once
    again = {b.preset: b.plots for b in rep.build_boards(store, bench, plot_cache=cache)}
    assert again == first and plot_files(cache) == files        # served, not drawn again

    add_run(store, "ce1", "ce", 1, 30.0)                          # the paper board's means change
    changed = {b.preset: b.plots for b in rep.build_boards(store, bench, plot_cache=cache)}
    fresh = {b.preset: b.plots for b in rep.build_boards(store, bench, plot_cache=tmp_path / "empty")}
    assert changed == fresh
    assert changed["paper"][PER_CLASS] != first["paper"][PER_CLASS]
    assert changed["quick"] == first["quick"]
    assert len(plot_files(cache)) == 3                            # the replaced plot is forgotten


def test_a_seed_run_again_counts_once_with_its_latest_result(tmp_path, bench):
    store = Store(f"sqlite:///{tmp_path / 'again.db'}")
    add_run(store, "old", "ce", 0, 80.0)
    add_run(store, "new", "ce", 0, 84.0)   # the same seed and setup, finished later
    add_run(store, "other", "ce", 1, 86.0)
    [board] = rep.build_boards(store, bench, plots=False)
    row = board.rows.set_index("method").loc["ce"]
    assert row["n"] == 2 and row["all_mean"] == pytest.approx(85.0)


def sweep(value):
    return [{"kind": "tau_sweep", "x": x, "split": "test", "group": "all", "value": value + x} for x in (0.0, 1.0)]


def test_plots_average_the_runs_the_table_counts_each_setup_apart_on_every_backend(store_url, bench):
    """A seed run again counts once in the plots too, with its latest result, and a method on
    two setups is two lines, named by what differs: averaging them would plot a run nobody made."""
    store = Store(store_url)
    add_run(store, "old", "tau_norm", 0, 10.0, curves=sweep(10.0))      # superseded by "new"
    add_run(store, "new", "tau_norm", 0, 80.0, curves=sweep(80.0))
    add_run(store, "other", "tau_norm", 1, 90.0, curves=sweep(90.0))
    add_run(store, "deep", "tau_norm", 0, 40.0, backbone="resnet34-cifar", curves=sweep(40.0))
    add_run(store, "ce", "ce", 0, 70.0)
    results = rep.load_results(store)
    assert sorted(results["id"]) == ["ce", "deep", "new", "other"]
    means = rep.load_class_means(store)
    means = means.assign(setup=rep.setup_names(means)).groupby(["method", "setup"])["accuracy"].mean()
    assert means.to_dict() == {("ce", ""): 70.0, ("tau_norm", "backbone resnet32"): 85.0,
                               ("tau_norm", "backbone resnet34-cifar"): 40.0}
    sweeps = rep.load_curves(store, "tau_sweep")
    sweeps = sweeps.assign(setup=rep.setup_names(sweeps))
    assert sweeps[["setup", "x", "value"]].values.tolist() == [["backbone resnet32", 0.0, 85.0],
                                                               ["backbone resnet32", 1.0, 86.0],
                                                               ["backbone resnet34-cifar", 0.0, 40.0],
                                                               ["backbone resnet34-cifar", 1.0, 41.0]]
    [board] = rep.build_boards(store, bench, plots=False)   # the table counts the same runs
    tau = board.rows[board.rows["method"] == "tau_norm"].set_index("backbone")
    assert tau[["n", "all_mean"]].to_dict("index") == {"resnet32": {"n": 2, "all_mean": 85.0},
                                                       "resnet34-cifar": {"n": 1, "all_mean": 40.0}}


def reliability(*accuracies):
    return [{"kind": "reliability", "x": round((b - 0.5) / 15 * 100, 4), "split": "test", "group": "all", "value": a}
            for b, a in accuracies]


def test_a_board_draws_the_reliability_of_the_runs_that_measured_it_in_their_per_class_colours(tmp_path, bench,
                                                                                              monkeypatch):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    add_run(store, "ce0", "ce", 0, 80.0, curves=reliability((14, 70.0), (15, 90.0)))
    add_run(store, "ce1", "ce", 1, 82.0, curves=reliability((14, 80.0)))       # no image in its bin 15
    add_run(store, "ncm0", "ncm", 0, 75.0)                                      # distances: no diagram
    add_run(store, "wb0", "wb", 0, 85.0, curves=reliability((10, 60.0)))
    add_run(store, "q0", "ce", 0, 50.0, preset="quick")                         # stored before diagrams
    [board] = [b for b in rep.build_boards(store, bench, plot_cache=tmp_path / "plots") if b.preset == "paper"]
    assert list(board.plots) == [PER_CLASS, WEIGHT_NORMS, RELIABILITY]
    assert board.plots[RELIABILITY].startswith("data:image/png;base64,")
    monkeypatch.setattr(rep, "Rendering", lambda jobs, cache, prune: jobs)   # the jobs, undrawn
    jobs = rep.start_plots(store, {}, rep.PlotCache(tmp_path / "plots"), rep.load_titles(store).labels)
    paper, quick = ("cifar10-lt", "", 10.0, "paper"), ("cifar10-lt", "", 10.0, "quick")
    assert (quick, RELIABILITY) not in jobs and (quick, PER_CLASS) in jobs
    # the seeds' mean per bin; CE and WB look as in the per-class plot (CE, NCM, WB: its lines 0, 1, 2)
    assert jobs[paper, RELIABILITY].data.values.tolist() == [["CE", 0, 90.0, 75.0], ["CE", 0, 96.6667, 90.0],
                                                              ["WB", 2, 63.3333, 60.0]]


def test_no_two_lines_of_a_board_of_more_than_ten_rows_look_alike():
    """Matplotlib has ten colours: the eleventh row's line is the first's colour, dashed."""
    from matplotlib.colors import to_hex

    from harness.report_plots import draw_per_class, draw_reliability, draw_weight_norms

    rows = [f"m{i:02d}" for i in range(15)]
    classes = pd.DataFrame([{"line": m, "class_index": c, "train_count": 100 // (c + 1), "weight_norm": 1.0,
                             "accuracy": 50.0} for m in rows for c in range(3)])
    for draw in (draw_per_class, draw_weight_norms):
        lines = [line for line in drawn_lines(draw, classes).get_lines() if line.get_label() in rows]
        looks = {line.get_label(): (to_hex(line.get_color()), line.get_linestyle()) for line in lines}
        assert len(set(looks.values())) == 15 and looks["m00"][0] == looks["m10"][0] != looks["m01"][0]
    bins = pd.DataFrame([{"line": m, "look": i, "x": 50.0, "value": 40.0} for i, m in enumerate(rows)])
    reliability = {line.get_label(): (to_hex(line.get_color()), line.get_linestyle())
                   for line in drawn_lines(draw_reliability, bins).get_lines() if line.get_label() in rows}
    assert reliability == looks   # a row looks the same in every plot


def test_precision_is_part_of_a_setup_and_named_against_the_papers_fp32_on_every_backend(store_url, bench):
    """A GPU run from before precision was recorded computed in bf16 (autocast); one asked for in
    fp32 is the CPU's setup (the later run of the seed counts); bf16 is its own row, and the
    papers' fp32 is named beside its Δ, which stays."""
    store = Store(store_url)
    add_run(store, "cpu", "ce", 0, 80.0)
    add_run(store, "gpu-old", "ce", 0, 84.0, device="NVIDIA H100 80GB HBM3")
    add_run(store, "gpu-fp32", "ce", 0, 82.0, device="NVIDIA H100 80GB HBM3", extra={"precision": "fp32"})
    [board] = rep.build_boards(store, bench, plots=False)
    rows = board.rows.set_index("precision")
    assert rows[["n", "all_mean"]].to_dict("index") == {"bf16": {"n": 1, "all_mean": 84.0},
                                                        "fp32": {"n": 1, "all_mean": 82.0}}
    assert rows.loc["bf16", "delta"] == pytest.approx(84.0 - 86.0)
    assert [d.name for d in rows.loc["bf16", "paper_differs"]] == ["selection", "precision"]
    assert "precision" not in [d.name for d in rows.loc["fp32", "paper_differs"]]
    assert sorted(rep.setup_cells(board)) == ["resnet32 · precision bf16", "resnet32 · precision fp32"]
    pwc = json.loads(rep.render_pwc_json([board]))[0]["datasets"][0]["sota"]["rows"]   # one name per row
    assert sorted(r["model_name"] for r in pwc) == ["CE (resnet32 · precision bf16)", "CE (resnet32 · precision fp32)"]


def test_a_recipe_another_benchmarks_file_changed_is_its_own_row_named_without_the_papers_delta(store_url, bench):
    """An ablation's copy of benchmarks.yaml (another weight decay) at preset paper took the place
    of the shipped recipe's run of the same seed and was compared with the paper; now it is a row
    of its own, named by what it changes, with no Δ."""
    store = Store(store_url)
    changed = {"recipe_changes": "stage1.weight_decay 0.05 (shipped 0.0002)"}
    add_run(store, "shipped", "ce", 0, 84.0)
    add_run(store, "ablation0", "ce", 0, 80.0, extra=changed)
    add_run(store, "ablation1", "ce", 1, 82.0, extra=changed)
    [board] = rep.build_boards(store, bench, plots=False)
    assert board.rows[["n", "all_mean"]].values.tolist() == [[1, 84.0], [2, 81.0]]
    assert board.rows.loc[0, "delta"] == pytest.approx(84.0 - 86.0) and pd.isna(board.rows.loc[1, "delta"])
    assert "recipe stage1.weight_decay 0.05 (shipped 0.0002)" in [str(d) for d in board.rows.loc[1, "paper_differs"]]
    assert rep.setup_cells(board) == ["resnet32", "resnet32 · recipe stage1.weight_decay 0.05 (shipped 0.0002)"]


def test_compute_is_labelled_gpu_for_every_device_but_the_cpu(store_url):
    """The CPU as device_name stores it (alone, or under torchrun) is CPU; any accelerator, an AMD
    one too, is GPU (a list of NVIDIA names called an MI300X's minutes CPU)."""
    store = Store(store_url)
    add_run(store, "cpu", "ce", 0, 80.0, device="cpu (AMD EPYC, 2 threads, AVX2)")
    add_run(store, "ddp", "crt", 0, 80.0, device="2 x cpu (Intel Xeon, 8 threads, AVX512) (torchrun)")
    add_run(store, "old", "lws", 0, 80.0, device="cpu (2 threads)")
    add_run(store, "amd", "wb", 0, 80.0, device="AMD Instinct MI300X")
    add_run(store, "nv", "fbl", 0, 80.0, device="NVIDIA H200")
    assert rep.load_results(store).set_index("id")["gpu"].to_dict() == {
        "cpu": False, "ddp": False, "old": False, "amd": True, "nv": True}


def test_a_tau_chosen_on_test_is_its_own_row_and_named_on_every_output(store_url, bench):
    """A τ-norm run without a validation split chose τ on test (an oracle): it neither replaces
    the seed's val-chosen run nor hides in its mean, and every output names it, also on a
    board where no run had a validation split."""
    store = Store(store_url)
    add_run(store, "val", "tau_norm", 0, 84.0, extra={"tau_selected_on": "val"})
    add_run(store, "oracle", "tau_norm", 0, 86.0, extra={"tau_selected_on": "test"})   # newer, same seed
    add_run(store, "ce", "ce", 0, 80.0)
    [board] = rep.build_boards(store, bench, plots=False)
    rows = board.rows.set_index("method")
    assert sorted(zip(rows["all_mean"], rows["tau_chosen_on"].fillna("—"))) == [
        (80.0, "—"), (84.0, "val"), (86.0, "test")]
    cells = dict(zip(board.rows["all_mean"], rep.setup_cells(board)))
    assert cells == {86.0: "resnet32 · τ chosen on test", 84.0: "resnet32 · τ chosen on val", 80.0: "resnet32"}
    store.delete_runs(["val", "ce"])
    [board] = rep.build_boards(store, bench, plots=False)   # every row's τ on test: still named
    assert rep.setup_cells(board) == ["resnet32 · τ chosen on test"]
    tex = rep.render_latex([board])
    # pdflatex takes the middle dot as it is, not Greek: "Unicode character τ not set up for use with LaTeX"
    assert "resnet32 · $\\tau$ chosen on test" in tex and {ch for ch in tex if ord(ch) > 127} <= {"·"}
    assert rep.method_results([board])["tau_norm"][0]["model"] == "τ-norm (resnet32 · τ chosen on test, preset paper, n=1)"
    [pwc] = json.loads(rep.render_pwc_json([board]))[0]["datasets"][0]["sota"]["rows"]
    assert pwc["model_name"] == "τ-norm"   # one setup of the method: named by the board's row
    classes = rep.load_class_means(store)
    assert rep.setup_names(classes) == ["τ chosen on test"] * 10


def test_a_legend_of_long_entries_gets_the_columns_that_fit_across_the_plot():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from harness.report_plots import WIDTH, fitting_columns

    fig = Figure(figsize=(WIDTH, 4), dpi=110)
    ax = fig.add_subplot()
    short = [ax.plot([0, 1], [0, 1], label=name)[0] for name in ["ce", "balanced_softmax", "wb", "crt", "lws", "ncm"]]
    assert fitting_columns(fig, short, [h.get_label() for h in short], 6) == 6
    long = [ax.plot([0, 1], [0, 1], label=f"val all (backbone resnet34-cifar, epochs {e})")[0] for e in range(4)]
    columns = fitting_columns(fig, long, [h.get_label() for h in long], 4)
    assert 1 <= columns < 4
    legend = fig.legend(long, [h.get_label() for h in long], ncol=columns, fontsize=7)
    assert legend.get_window_extent(FigureCanvasAgg(fig).get_renderer()).width <= fig.bbox.width


def test_bin_means_average_classes_within_equal_bins_of_x_or_log_x():
    from harness.report_plots import bin_means

    x, y = bin_means(pd.Series([0, 1, 2, 9, 10]), pd.Series([10.0, 20.0, 30.0, 40.0, 50.0]), bins=2, log=False)
    assert x.tolist() == [1.0, 9.5] and y.tolist() == [20.0, 45.0]   # [0, 5), [5, 10]: the top edge is in
    # log bins of counts 1..1000: [1, 10^1.5) and [10^1.5, 1000]; x is the bin's geometric mean; count 0 has no place
    x, y = bin_means(pd.Series([0, 1, 100, 1000]), pd.Series([99.0, 10.0, 20.0, 40.0]), bins=2, log=True)
    assert x == pytest.approx([1.0, 10 ** 2.5]) and y.tolist() == [10.0, 30.0]


def drawn_lines(draw, data):
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    draw(ax, data)
    return ax


def test_weight_norms_run_head_to_tail_by_training_count_and_many_classes_are_binned():
    """ImageNet-LT's class labels are not in order of frequency, as CIFAR-LT's are: the plot
    orders classes by their training count. A thousand classes one by one are a band: they
    are averaged in bins, and the title says so."""
    from harness.report_plots import MOST_CLASSES, draw_per_class, draw_weight_norms

    few = pd.DataFrame({"line": "ce", "class_index": [0, 1, 2], "train_count": [5, 50, 20],
                        "weight_norm": [0.5, 2.0, 1.0], "accuracy": [10.0, 90.0, 50.0]})
    [line] = drawn_lines(draw_weight_norms, few).get_lines()
    assert line.get_xdata().tolist() == [0, 1, 2] and line.get_ydata().tolist() == [2.0, 1.0, 0.5]
    ticks = drawn_lines(draw_weight_norms, few).get_xticks()
    assert all(t == int(t) for t in ticks), ticks   # class ranks, not 0.25 steps between them
    ax = drawn_lines(draw_per_class, few)
    assert ax.get_lines()[0].get_xdata().tolist() == [50, 20, 5] and "bins" not in ax.get_title()
    n = 10 * MOST_CLASSES
    many = pd.DataFrame({"line": "ce", "class_index": range(n), "train_count": np.arange(n)[::-1] + 1,
                         "weight_norm": np.linspace(2, 1, n), "accuracy": np.linspace(90, 10, n)})
    ax = drawn_lines(draw_weight_norms, many)
    assert len(ax.get_lines()[0].get_xdata()) == 50 and f"{n:,} classes: means over 50 bins" in ax.get_title()
    ax = drawn_lines(draw_per_class, many)
    # counts 1, 2, 3 leave the first log bins between them empty: those have no point
    assert 20 < len(ax.get_lines()[0].get_xdata()) < 30 and "30 log-spaced bins" in ax.get_title()
    assert np.all(np.diff(ax.get_lines()[0].get_ydata()) > 0)   # accuracy rises with the count, bin by bin


def test_titles_and_labels_come_from_the_runs_and_only_the_rest_from_plugins(tmp_path, monkeypatch):
    doc = json.loads(json.dumps(BENCH))
    doc["benchmarks"]["cifar10-lt"]["references"].append({"method": "focal", "rho": 50, "top1": 1.0,
                                                           "protocol": LDAM, "source": "no board's ratio"})
    bench = tmp_path / "b.yaml"
    bench.write_text(yaml.safe_dump(doc, allow_unicode=True))
    store = Store(f"sqlite:///{tmp_path / 'titles.db'}")
    add_run(store, "r", "ce", 0, 80.0, extra={"method_title": "Cross-entropy", "method_label": "CE",
                                                "method_paper": "a paper", "dataset_title": "CIFAR-10-LT"})
    looked_up = []
    monkeypatch.setattr(rep, "method_about", lambda name, recorded=None: looked_up.append(name) or
                        {"title": f"{name} title", "label": name.upper(), "paper": ""})
    monkeypatch.setattr(rep, "dataset_title", lambda name: pytest.fail("looked up a plugin"))
    [board] = rep.build_boards(store, str(bench), plots=False)
    assert board.title == "CIFAR-10-LT" and board.about["ce"] == {"title": "Cross-entropy", "label": "CE",
                                                                  "paper": "a paper"}
    assert sorted(looked_up) == ["lws", "wb"]   # the board's references' methods, which no run recorded
    assert [r[0] for r in rep.reference_table(board)[1]] == ["CE", "CE", "WB", "WB", "LWS"]


def test_a_run_older_than_labels_takes_its_plugins_label_or_else_keeps_its_title_and_name(tmp_path, bench):
    store = Store(f"sqlite:///{tmp_path / 'old.db'}")
    add_run(store, "old", "tau_norm", 0, 80.0, extra={"method_title": "τ-norm", "method_paper": "Kang"})
    add_run(store, "gone", "uninstalled", 0, 70.0, extra={"method_title": "Some method", "method_paper": "q"})
    [board] = rep.build_boards(store, bench, plots=False)
    assert board.about["tau_norm"]["label"] == "τ-norm"   # methods/tau_norm.py's
    assert board.about["uninstalled"] == {"title": "Some method", "label": "uninstalled", "paper": "q"}
    assert [r[1] for r in rep.board_table(board)[1]] == ["τ-norm", "uninstalled"]


def test_two_methods_of_one_label_are_told_apart_by_their_names_in_tables_and_plots(tmp_path, bench, monkeypatch):
    store = Store(f"sqlite:///{tmp_path / 'twice.db'}")
    for run_id, method, top1 in [("a", "ce", 80.0), ("b", "my_ce", 82.0), ("c", "wb", 70.0)]:
        add_run(store, run_id, method, 0, top1, extra={"method_title": "t", "method_label": method.upper()
                                                        .replace("MY_", ""), "method_paper": ""})
    monkeypatch.setattr(rep, "Rendering", lambda jobs, cache, prune: jobs)   # the jobs, undrawn
    [board] = rep.build_boards(store, bench, plots=False)
    assert [r[1] for r in rep.board_table(board)[1]] == ["CE (my_ce)", "CE (ce)", "WB"]
    assert [r[0] for r in rep.reference_table(board)[1]][:2] == ["CE (ce)", "CE (ce)"]
    jobs = rep.start_plots(store, {}, rep.PlotCache(tmp_path / "plots"), rep.load_titles(store).labels)
    assert sorted(set(jobs[board.key, PER_CLASS].data["line"])) == ["CE (ce)", "CE (my_ce)", "WB"]
    index, page = (path.read_text() for path in rep.render_html([board], tmp_path / "site")[:2])
    assert '<a href="method-my_ce.html" title="t (my_ce)">CE (my_ce)</a>' in page
    assert '<td><a href="method-my_ce.html">CE (my_ce)</a></td>' in index   # the leader
