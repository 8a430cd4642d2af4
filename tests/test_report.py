"""Reports from a store of known rows: ranks, mean ± std, ties, Δ, escaping, empty groups."""
import csv
import io
import json
import statistics

import pandas as pd
import pytest
import yaml

from harness import report as rep
from harness.store import Run, Store, now

BENCH = {
    "version": 1,
    "benchmarks": {
        "cifar10-lt": {
            "rhos": [10], "backbone": "resnet32", "metric": "error", "presets": {"paper": {}, "quick": {}},
            "methods": {}, "references": [
                {"method": "ce", "rho": 10, "top1": 86.0, "backbone": "resnet32", "source": "Some paper, Table 1"}],
        }
    },
}

EVIL = "<script>alert(1)</script>"


def add_run(store, run_id, method, seed, top1, preset="paper", groups=None, device="cpu (2 threads)"):
    groups = groups or {"many": top1 + 5, "medium": None, "few": None}  # CIFAR-10-LT rho 10: all many
    store.start_run(Run(id=run_id, method=method, dataset="cifar10-lt", rho=10.0, backbone="resnet32", seed=seed,
                        generator="ldam", preset=preset, config={}, config_hash=run_id, status="running",
                        started_at=now(), device=device, git_commit="abcdef1234", versions={},
                        data_checksum="x", extra={}))
    metrics = [{"split": "test", "group": "all", "top1": top1, "error": 100 - top1, "n_classes": 10}]
    metrics += [{"split": "test", "group": g, "top1": v, "error": None if v is None else 100 - v, "n_classes": 10}
                for g, v in groups.items()]
    classes = [{"class_index": c, "class_name": f"k{c}", "train_count": 5000 // (c + 1), "accuracy": top1,
                "weight_norm": 1.0 + c} for c in range(10)]
    store.complete_run(run_id, metrics=metrics, class_metrics=classes, curves=[], extra={}, wall_seconds=120.0,
                       stage1_cached=False)


@pytest.fixture
def boards(tmp_path):
    bench = tmp_path / "b.yaml"
    bench.write_text(yaml.safe_dump(BENCH))
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
    return rep.build_boards(store, str(bench)), store, str(bench)


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


def test_overlapping_intervals_are_ties(tmp_path):
    bench = tmp_path / "b.yaml"
    bench.write_text(yaml.safe_dump(BENCH))
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    for seed, v in enumerate([80.0, 84.0]):
        add_run(store, f"a{seed}", "a", seed, v)   # 82 ± 2.83
    for seed, v in enumerate([79.0, 81.0]):
        add_run(store, f"b{seed}", "b", seed, v)   # 80 ± 1.41: overlaps [79.17, 84.83]
    add_run(store, "c0", "c", 0, 60.0)
    [board] = rep.build_boards(store, str(bench), plots=False)
    assert board.rows["tie"].tolist() == [False, True, False]
    headers, rows = rep.board_table(board)
    assert rows[1][0] == "2 (tie)"


def test_delta_to_the_paper_and_leading_metric(boards):
    paper, quick = boards[0][0], boards[0][1]
    headers, rows = rep.board_table(paper)
    assert headers[3] == "Error" and headers[4] == "Top-1"   # CIFAR-LT leads with error, as PwC did
    ce = next(r for r in rows if r[1] == "ce")
    assert ce[3] == "11.00 ± 1.00" and ce[4] == "89.00 ± 1.00"
    assert ce[headers.index("Paper top-1")] == "86.00" and ce[headers.index("Δ")] == "+3.00"
    lws = next(r for r in rows if r[1] == "lws")
    assert lws[4] == "70.00 ± —" and lws[headers.index("Δ")] == "—"
    q = rep.board_table(quick)[1][0]
    assert q[headers.index("Δ")] == "—"  # a quick run is not compared with the paper


def test_empty_groups_render_as_dash_not_zero(boards):
    headers, rows = rep.board_table(boards[0][0])
    wb = next(r for r in rows if r[1] == "wb")
    assert wb[headers.index("Many")] == "97.00"
    assert wb[headers.index("Medium")] == "—" and wb[headers.index("Few")] == "—"


def test_html_escapes_and_is_self_contained(boards, tmp_path):
    bs, _, _ = boards
    files = rep.render_html(bs, tmp_path / "site")
    names = {f.name for f in files}
    assert {"index.html", "cifar10-lt-rho10-paper.html", "cifar10-lt-rho10-quick.html", "method-ce.html"} <= names
    page = (tmp_path / "site" / "cifar10-lt-rho10-paper.html").read_text()
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "http://" not in page and "https://" not in page  # no CDN, no network
    assert 'class="ref"' in page and "Some paper, Table 1" in page
    assert "data:image/png;base64," in page  # plots embedded
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
    assert "| 1      | wb" in readme or "| 1 " in readme


def test_csv_holds_numbers(boards):
    text = rep.render_csv(boards[0])
    rows = list(csv.DictReader(io.StringIO(text)))
    ce = next(r for r in rows if r["method"] == "ce" and r["preset"] == "paper")
    assert float(ce["all_mean"]) == pytest.approx(89.0) and float(ce["error_mean"]) == pytest.approx(11.0)
    assert ce["medium_mean"] == ""  # empty group is empty, not 0


def test_latex_escapes(boards):
    tex = rep.render_latex(boards[0])
    assert "\\begin{tabular}" in tex and "89.00 $\\pm$ 1.00" in tex
    assert "tau_norm" not in tex or "tau\\_norm" in tex


def test_pwc_json_shape(boards):
    doc = json.loads(rep.render_pwc_json(boards[0]))
    task = doc[0]
    assert task["task"] == "Long-tail Learning"
    ds = task["datasets"][0]
    assert ds["sota"]["metrics"][0] == "Error Rate"
    assert ds["sota"]["rows"][0]["model_name"] == "wb"
    assert set(ds["sota"]["rows"][0]["metrics"]) == {"Top-1 Accuracy", "Error Rate"}


def test_failed_runs_are_not_reported(boards):
    bs, _, _ = boards
    assert all(r != 0.0 for b in bs for r in b.rows["all_mean"])


def test_empty_store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'e.db'}")
    assert rep.build_boards(store) == []
    assert rep.render_terminal([]) == "no completed runs in the store"
