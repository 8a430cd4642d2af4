"""End to end on the synthetic dataset: real training, real store, tiny budget."""
import os
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

import harness.runner as runner_mod
from harness import HarnessError
from harness.data import calibration_error, confidence_bins
from harness.models import load_model
from harness.provenance import cpu_model, package_versions
from harness.runner import RunRequest, execute
from harness.store import ClassMetric, CurvePoint, Metric, Store
from tests.synthetic import SYNTH_COUNTS


def run(method, url, **kw):
    kw.setdefault("preset", "quick")
    return execute(RunRequest(method=method, dataset="synth-lt", rho=100, device="cpu", progress=False, **kw))


def test_ce_run_is_stored_with_groups_and_per_class_rows(synth):
    [res] = run("ce", synth)
    run_row = Store(synth).get_run(res.run_id)
    assert run_row.status == "completed" and run_row.preset == "quick"
    assert run_row.config["recipe"]["stage1"]["epochs"] == 2  # quick preset applied and recorded
    test = {m.group: m for m in run_row.metrics if m.split == "test"}
    assert {g: test[g].n_classes for g in test} == {"all": 6, "many": 1, "medium": 2, "few": 3}
    assert test["all"].top1 + test["all"].error == pytest.approx(100.0)
    assert [c.train_count for c in sorted(run_row.class_metrics, key=lambda c: c.class_index)] == SYNTH_COUNTS
    assert all(c.weight_norm > 0 for c in run_row.class_metrics)
    assert {m.split for m in run_row.metrics} == {"test", "val"}
    assert len(run_row.data_checksum) == 64 and run_row.versions["torch"]
    assert run_row.wall_seconds > 0 and run_row.git_commit
    # the kernels' instruction set decides a CPU run's rounding: named with the processor
    assert run_row.device == f"cpu ({cpu_model()}, {torch.get_num_threads()} threads, " \
                             f"{torch.backends.cpu.get_cpu_capability()})"
    assert "cuda" not in run_row.versions   # the CUDA build's versions only where a run used it


def test_a_cuda_run_records_the_cuda_and_cudnn_torch_was_built_with():
    versions = package_versions(torch.device("cuda"))
    assert versions["cuda"] == str(torch.version.cuda) and versions["cudnn"] == str(torch.backends.cudnn.version())


def test_stage2_methods_reuse_the_ce_stage1_checkpoint(synth, monkeypatch):
    calls = []
    real_fit_many, real_train = runner_mod.fit_many, runner_mod.train

    def counting_fit_many(trainers, *args, **kw):
        calls.extend(["stage1"] * len(trainers))
        return real_fit_many(trainers, *args, **kw)

    def counting_train(model, data, spec, seed, *args, **kw):
        calls.append("stage2" if spec.frozen_backbone else "other")
        return real_train(model, data, spec, seed, *args, **kw)

    monkeypatch.setattr(runner_mod, "fit_many", counting_fit_many)
    monkeypatch.setattr(runner_mod, "train", counting_train)
    [ce] = run("ce", synth)
    assert calls == ["stage1"] and not ce.stage1_cached
    [crt] = run("crt", synth)
    [crt_again] = run("crt", synth)
    [lws] = run("lws", synth)
    [tau] = run("tau_norm", synth)
    assert calls == ["stage1", "stage2", "stage2", "stage2"]  # stage 1 trained once
    assert crt.stage1_cached and crt_again.stage1_cached and lws.stage1_cached and tau.stage1_cached
    assert crt.extra["stage1_checkpoint"] == ce.extra["stage1_checkpoint"]
    [wb] = run("wb", synth)  # different stage-1 recipe (weight decay): its own checkpoint
    assert not wb.stage1_cached and wb.extra["stage1_checkpoint"] != ce.extra["stage1_checkpoint"]


def test_a_run_without_a_validation_split_reuses_the_stage1_of_one_with_it(synth):
    """Stage 1 never learns from the validation split: a τ-norm holding none out (τ chosen on test)
    trains on the same images as CE with one, and reuses its stage 1 rather than training it again."""
    [ce] = run("ce", synth)
    [tau] = run("tau_norm", synth, val_per_class=0)
    assert tau.stage1_cached and tau.extra["stage1_checkpoint"] == ce.extra["stage1_checkpoint"]
    store = Store(synth)
    assert store.get_run(ce.run_id).data_checksum != store.get_run(tau.run_id).data_checksum   # not the same data
    assert tau.extra["tau_selected_on"] == "test"
    [first] = run("ce", synth, generator="first")   # other training images: a stage 1 of their own
    assert not first.stage1_cached


def test_a_run_of_another_benchmarks_file_records_what_it_changes(synth, tmp_path, monkeypatch):
    """Against the shipped file (here the synthetic one), in the run's record, which its board row
    is named by; a dataset the shipped file lacks records nothing (the synthetic one, elsewhere)."""
    import os

    import harness.config as config

    shipped = os.environ["HARNESS_BENCHMARKS"]
    monkeypatch.setattr(config, "SHIPPED_BENCHMARKS", Path(shipped).resolve())
    ablation = tmp_path / "ablation.yaml"
    ablation.write_text(Path(shipped).read_text().replace("ce: {stage1: *tiny}",
                                                          "ce: {stage1: {<<: *tiny, weight_decay: 0.05}}"))
    [plain] = run("ce", synth)
    [changed] = run("ce", synth, benchmarks=str(ablation))
    assert "recipe_changes" not in plain.extra
    assert Store(synth).get_run(changed.run_id).extra["recipe_changes"] == "stage1.weight_decay 0.05 (shipped 0.0005)"


def test_tau_norm_stores_the_whole_sweep_and_both_selections(synth):
    [res] = run("tau_norm", synth)
    with Store(synth).session() as s:
        points = s.scalars(select(CurvePoint).where(CurvePoint.run_id == res.run_id,
                                                    CurvePoint.kind == "tau_sweep")).all()
    assert len(points) == 21 * 2 * 4  # τ grid × {val, test} × {all, many, medium, few}
    assert res.extra["tau_selected_on"] == "val"
    assert res.extra["tau"] in [p.x for p in points]
    best_val = max((p for p in points if p.split == "val" and p.group == "all"), key=lambda p: (p.value, -p.x))
    assert res.extra["tau"] == best_val.x
    test_at_tau = next(p.value for p in points if p.split == "test" and p.group == "all" and p.x == res.extra["tau"])
    assert res.metrics["test"]["all"] == pytest.approx(test_at_tau)
    assert "tau_test_selected" in res.extra


@pytest.mark.parametrize("method", ["tau_norm", "la_posthoc"])
def test_without_a_validation_split_tau_is_chosen_on_test_recorded_and_said(synth, method, capsys):
    [res] = run(method, synth, val_per_class=0)
    assert res.extra["tau_selected_on"] == "test"
    oracle = res.extra.get("tau_test_selected", res.extra.get("tau_oracle"))
    assert res.extra["tau"] == oracle   # the test pick is the oracle's
    assert "no validation split: τ is chosen on test, an oracle" in capsys.readouterr().err


def test_wb_records_the_cap(synth):
    [res] = run("wb", synth)
    assert res.extra["maxnorm_steps"] > 0
    assert 0 <= res.extra["maxnorm_active_steps"] <= res.extra["maxnorm_steps"]
    assert res.extra["stage2_bn_mode"] == "train"


def test_fbl_runs(synth):
    [res] = run("fbl", synth)
    assert res.extra["stage1_loss_id"] == "fbl(lambda=60.0)"


def test_seeds_trained_together_equal_seeds_trained_alone(synth, tmp_path, monkeypatch):
    together = run("ce", synth, seeds=[0, 1])
    assert [r.config.seed for r in together] == [0, 1]
    assert together[0].config.config_hash() != together[1].config.config_hash()
    assert together[0].metrics != together[1].metrics
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "alone"))
    alone = [run("ce", synth, seeds=[s])[0] for s in (0, 1)]
    assert [r.metrics for r in alone] == [r.metrics for r in together]


def test_same_seed_is_deterministic_on_cpu(synth, tmp_path, monkeypatch):
    [a] = run("ce", synth)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache2"))
    [b] = run("ce", synth)
    assert not b.stage1_cached
    assert a.metrics == b.metrics


def test_a_batch_the_training_set_cannot_fill_names_its_stage_and_a_batch_that_fits(synth):
    """A class-aware epoch is int(N / batch) full batches; none is an error naming what --set fits
    (before, "lower the batch size", of whichever stage). Stage 1 is kept for the rerun."""
    with pytest.raises(HarnessError, match=r"(\d+) training images make no full batch of 999; pass a smaller batch: "
                                           r"--set stage2.batch_size=\1 \(or less\)") as failed:
        run("crt", synth, settings={"stage2.batch_size": 999})
    n_train = int(str(failed.value).split()[0])
    assert n_train <= sum(SYNTH_COUNTS)
    [fits] = run("crt", synth, settings={"stage2.batch_size": n_train})
    assert fits.stage1_cached


def test_a_crash_leaves_a_failed_row_and_no_metrics(synth, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated crash in stage 2")

    from methods.crt import METHOD
    monkeypatch.setattr(METHOD, "stage2", boom)
    with pytest.raises(RuntimeError):
        run("crt", synth)
    store = Store(synth)
    [row] = [r for r in store.list_runs() if r.method == "crt"]
    assert row.status == "failed" and "simulated crash" in row.error
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Metric).where(Metric.run_id == row.id)) == 0
        assert s.scalar(select(func.count()).select_from(ClassMetric).where(ClassMetric.run_id == row.id)) == 0


def test_nan_loss_fails_the_run_with_its_epoch_and_no_metrics(synth):
    import torch
    import torch.nn.functional as F

    from harness import HarnessError
    from harness.method import Method
    from harness.registry import METHODS

    class Diverges(Method):
        name = "diverges"

        def stage1_loss(self, ctx):
            def loss(logits, feats, y, epoch):  # fine in epoch 0, NaN from epoch 1 on
                return F.cross_entropy(logits, y) * torch.where(epoch >= 1, float("nan"), 1.0)
            return "diverges", loss

    METHODS.register("diverges", Diverges())
    try:
        with pytest.raises(HarnessError, match="loss became nan in epoch 1"):
            run("diverges", synth, epochs=3)
    finally:
        METHODS.unregister("diverges")
    [row] = Store(synth).list_runs()
    assert row.status == "failed" and row.failed_epoch == 1 and "epoch 1" in row.error
    assert Store(synth).get_run(row.id).metrics == []


LOSS_METHODS = ["ce_drw", "ldam_drw", "focal", "cb_loss", "logit_adjust", "balanced_softmax", "mislas"]


@pytest.mark.parametrize("method", LOSS_METHODS)
def test_a_baseline_trains_its_own_stage_1_not_ce(synth, method):
    [ce] = run("ce", synth)
    [res] = run(method, synth, preset="paper" if method == "balanced_softmax" else "quick")  # its warm-up needs 3
    assert not res.stage1_cached and res.extra["stage1_checkpoint"] != ce.extra["stage1_checkpoint"]
    assert res.extra["stage1_loss_id"] != ce.extra["stage1_loss_id"]
    assert res.metrics["test"] != ce.metrics["test"]


def test_ncm_reuses_ce_and_classifies_by_its_centroids(synth):
    [ce] = run("ce", synth)
    [res] = run("ncm", synth)
    assert res.stage1_cached and res.extra["stage1_checkpoint"] == ce.extra["stage1_checkpoint"]
    norms = {r: [c.weight_norm for c in sorted(Store(synth).get_run(r).class_metrics, key=lambda c: c.class_index)]
             for r in (ce.run_id, res.run_id)}
    assert norms[ce.run_id] != norms[res.run_id] and max(norms[res.run_id]) <= 1.0  # cl2n centroids, not CE's W


def test_posthoc_adjustment_reuses_ce_and_predicts_at_the_val_chosen_tau(synth):
    [ce] = run("ce", synth)
    [res] = run("la_posthoc", synth)
    assert res.stage1_cached and res.extra["stage1_checkpoint"] == ce.extra["stage1_checkpoint"]
    assert res.extra["tau_selected_on"] == "val" and 0.0 <= res.extra["tau"] <= 4.0
    with Store(synth).session() as s:
        sweep = {(p.split, p.group, p.x): p.value for p in s.scalars(
            select(CurvePoint).where(CurvePoint.run_id == res.run_id, CurvePoint.kind == "la_tau_sweep"))}
    assert len(sweep) == 17 * 2 * 4  # τ = 0, 0.25, ..., 4 on val and test, four groups
    assert res.metrics["test"]["all"] == pytest.approx(sweep[("test", "all", res.extra["tau"])])
    assert sweep[("test", "all", 0.0)] == pytest.approx(ce.metrics["test"]["all"])  # τ = 0 is CE itself
    assert res.extra["tau1_test_top1"] == pytest.approx(sweep[("test", "all", 1.0)])
    assert res.extra["tau_oracle_test_top1"] == max(v for (s, g, _), v in sweep.items() if (s, g) == ("test", "all"))


def test_a_fresh_block_on_a_frozen_trunk_trains_alone(synth, tmp_path, monkeypatch):
    """The Places-LT recipe of MiSLAS and FBL in miniature: `fresh` re-initialises the block,
    `train_only` freezes the rest, `train_mode_only` keeps the trunk's BatchNorm statistics."""
    import torch

    from tests.synthetic import BENCHMARKS_YAML

    def stage1_of(ce_stage1: str, name: str) -> dict:
        bench = tmp_path / f"{name}.yaml"
        bench.write_text(BENCHMARKS_YAML.replace("ce: {stage1: *tiny}", f"ce: {{stage1: {ce_stage1}}}"))
        monkeypatch.setenv("HARNESS_BENCHMARKS", str(bench))
        [result] = execute(RunRequest(method="ce", dataset="synth-lt", rho=100, preset="quick", device="cpu",
                                      progress=False))
        path = tmp_path / "cache" / "stage1" / result.extra["stage1_checkpoint"]
        return torch.load(path, weights_only=True)["model"]

    frozen = "train_only: [body.3., body.4., fc.], train_mode_only: [body.4.]"
    fresh = stage1_of(f"{{<<: *tiny, {frozen}, fresh: [body.3., body.4.]}}", "fresh")
    pretrained = stage1_of(f"{{<<: *tiny, {frozen}}}", "kept")   # the same, the block as built
    torch.manual_seed(0)
    initial = runner_mod.build_model("fmnist-cnn", 6, 1).state_dict()
    for key in ("body.0.weight", "body.1.weight", "body.1.running_mean", "body.1.num_batches_tracked",
                "body.7.running_var"):   # the trunk: frozen, statistics included
        assert torch.equal(fresh[key], initial[key]) and torch.equal(pretrained[key], initial[key]), key
    assert not torch.equal(fresh["body.4.running_mean"], initial["body.4.running_mean"])   # the block trains
    assert not torch.equal(fresh["body.3.weight"], pretrained["body.3.weight"])   # from another start


def test_on_epoch_sees_val_top1_after_every_epoch_of_both_stages_and_changes_nothing(synth, tmp_path):
    """What pruning reads (`harness tune --prune`): after each epoch, counted over both stages,
    the model's val top-1; the last is the run's own. Evaluating between epochs leaves the
    training as it was (modes restored, no random draw)."""
    seen = []
    [crt] = run("crt", synth, cache_dir=str(tmp_path / "c1"),
                on_epoch=lambda run_id, epoch, top1: seen.append((run_id, epoch, top1)))
    assert [(r, e) for r, e, _ in seen] == [(crt.run_id, 0), (crt.run_id, 1), (crt.run_id, 2)]
    assert seen[-1][2] == pytest.approx(crt.metrics["val"]["all"])
    [unwatched] = run("crt", synth, cache_dir=str(tmp_path / "c2"))
    assert unwatched.metrics == crt.metrics


class Crashed(Exception):
    pass


@pytest.mark.parametrize("stop,partials_kept", [(runner_mod.RunStopped, 0), (Crashed, 2)])
def test_on_epoch_raising_stops_the_run_there_and_its_row_says_why(synth, tmp_path, stop, partials_kept):
    """RunStopped (a pruned trial) ends the run on purpose: no epoch checkpoint stays behind to
    resume it. Any other error is a crash, whose checkpoint (and the one before) a rerun resumes from."""
    epochs = []

    def stop_after_first(run_id, epoch, top1):
        epochs.append(epoch)
        if epoch == 1:
            raise stop(f"val top-1 {top1:.2f} after epoch {epoch + 1}")

    with pytest.raises(stop):
        run("ce", synth, on_epoch=stop_after_first)
    [row] = Store(synth).list_runs()
    assert epochs == [0, 1] and row.status == "failed" and row.error.startswith(f"{stop.__name__}: val top-1 ")
    assert len(list((tmp_path / "cache" / "partial").glob("*.pt"))) == partials_kept


def test_the_precision_asked_for_is_what_the_forward_passes_compute_in_and_is_recorded(synth):
    """--precision bf16 on the CPU runs the forward passes under bf16 autocast (the losses move),
    is part of the config and its hash, and every run records the precision it computed in;
    a run at the device's default stores no precision in its config, as runs did before, and so does
    one that asks for the default by name (fp32 on the CPU): it is the same run, its stage 1 shared."""
    def losses(run_id):
        curves = Store(synth).get_run(run_id).curves
        return [c.value for c in sorted(curves, key=lambda c: c.x) if c.kind == "train_loss"]

    [default] = run("ce", synth)
    [bf16] = run("ce", synth, precision="bf16")
    [fp32] = run("ce", synth, precision="fp32")
    assert "precision" not in default.config.to_dict() and bf16.config.to_dict()["precision"] == "bf16"
    assert (default.extra["precision"], bf16.extra["precision"], fp32.extra["precision"]) == ("fp32", "bf16", "fp32")
    assert default.config.config_hash() != bf16.config.config_hash()
    assert fp32.config.config_hash() == default.config.config_hash() and "precision" not in fp32.config.to_dict()
    assert not bf16.stage1_cached and fp32.stage1_cached   # bf16: another arithmetic, its own stage 1
    assert losses(fp32.run_id) == losses(default.run_id)       # the CPU's default is fp32
    assert losses(bf16.run_id) != pytest.approx(losses(default.run_id), rel=1e-6)


def test_out_of_memory_names_a_smaller_batch_for_each_stage_the_recipe_trains():
    from harness.config import load_benchmarks, resolve
    from harness.runner import out_of_memory_text

    doc = load_benchmarks("benchmarks.yaml")
    crt = resolve(doc, method="crt", dataset="imagenet-lt", rho=256.0, seed=0, preset="paper")
    text = out_of_memory_text(RuntimeError("CUDA out of memory. Tried to allocate 9 GiB. More"), "cuda", crt, 1, "bf16")
    half1, half2 = crt.recipe["stage1"]["batch_size"] // 2, crt.recipe["stage2"]["batch_size"] // 2
    assert f"a smaller batch (--set stage1.batch_size={half1} or stage2.batch_size={half2})" in text


def test_running_out_of_gpu_memory_is_one_line_naming_the_fixes(synth, monkeypatch):
    """torch's CUDA OOM is a page of allocator statistics; the run's row and the CLI get what
    was asked for and what to change. (No GPU here: the error is raised where training runs.)"""
    def out_of_memory(*_args, **_kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                          "capacity of 79.11 GiB of which 1.06 GiB is free. Including non-PyTorch")
    monkeypatch.setattr(runner_mod, "fit_many", out_of_memory)
    with pytest.raises(HarnessError) as caught:
        execute(RunRequest(method="ce", dataset="synth-lt", rho=100, preset="quick", seeds=[0, 1], device="cpu",
                           progress=False))
    message = str(caught.value)
    assert message.startswith("CUDA out of memory. Tried to allocate 2.00 GiB on cpu (")
    assert message.endswith("; try fewer --seeds per command (they train at once), --precision bf16, a smaller "
                            "batch (--set stage1.batch_size=16) or spreading each batch over "
                            "GPUs with torchrun") and "\n" not in message
    rows = Store(synth).list_runs()
    assert [r.status for r in rows] == ["failed", "failed"] and {r.error for r in rows} == {message}


# a stage-2 head, a shifted head, class means, a cosine head whose loss scales it
@pytest.mark.parametrize("method", ["crt", "la_posthoc", "ncm", "ldam_drw"])
def test_a_saved_model_predicts_and_is_as_calibrated_as_the_run_stored_from_the_inputs_it_names(synth, tmp_path, method):
    from tests.synthetic import SYNTH_LT

    [res] = run(method, synth, save_model=str(tmp_path / "models"))
    stored = Store(synth).get_run(res.run_id)
    path = Path(stored.extra["model_file"])
    assert path == (tmp_path / "models" / f"{res.run_id}.pt").resolve()
    saved = load_model(path)   # torch's weights-only unpickler, the file's layers allowed
    assert saved["run_id"] == res.run_id and saved["config"] == stored.config
    assert saved["class_names"] == [f"c{i}" for i in range(6)]
    mean, std = torch.tensor(saved["inputs"]["mean"]), torch.tensor(saved["inputs"]["std"])
    data = SYNTH_LT.build(100.0, "ldam", stored.config["val_per_class"], None)
    x = (data.test_x.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    with torch.no_grad():
        outputs = saved["model"](x)
    predicted = outputs.argmax(1)
    accuracy = [100.0 * (predicted[data.test_y == c] == c).float().mean().item() for c in range(6)]
    assert accuracy == pytest.approx([c.accuracy for c in sorted(stored.class_metrics, key=lambda c: c.class_index)])
    ece = {m.group: m.ece for m in stored.metrics if m.split == "test"}
    if method == "ncm":   # distances, not logits: no calibration
        assert set(ece.values()) == {None} and not [c for c in stored.curves if c.kind == "reliability"]
        return
    probs = (stored.config["recipe"]["scale"] * outputs if method == "ldam_drw" else outputs).softmax(1)
    few = torch.tensor([SYNTH_COUNTS[c] < 20 for c in data.test_y])
    assert ece["all"] == pytest.approx(calibration_error(probs, data.test_y), abs=1e-4)
    assert ece["few"] == pytest.approx(calibration_error(probs[few], data.test_y[few]), abs=1e-4)
    assert ece["all"] != pytest.approx(ece["few"]) and 0 < ece["all"] < 100
    # its reliability diagram: test accuracy per confidence bin, at the bin's centre
    curve = sorted((c.x, c.value) for c in stored.curves if c.kind == "reliability")
    bins = confidence_bins(probs, data.test_y)
    assert [x for x, _ in curve] == pytest.approx([100 * b.centre for b in bins], abs=1e-4)   # x rounded
    assert [v for _, v in curve] == pytest.approx([100 * b.accuracy for b in bins], abs=1e-6)
    assert sum(b.images for b in bins) == len(data.test_y) and len(bins) > 1


class Payload:
    """What a hostile model file could hold: unpickled, it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_model_file_naming_anything_but_network_layers_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    torch.save({"model": torch.nn.Linear(2, 2), "run_id": "r", "extra": Payload(marker)}, path)
    with pytest.raises(HarnessError, match=r"model.pt names (posix|os)\.system, not a network layer .*not loaded"):
        load_model(path)
    assert not marker.exists()
    torch.save({"model": torch.nn.Sequential(torch.nn.Linear(2, 2)), "run_id": "r"}, path)
    assert isinstance(load_model(path)["model"][0], torch.nn.Linear)
    with pytest.raises(HarnessError, match=r"no model file at .*nope.pt; `harness show RUN_ID` names"):
        load_model(tmp_path / "nope.pt")


def test_a_saved_timm_vit_is_read_back_with_the_enum_its_layers_hold(tmp_path):
    """timm's ViT and Swin keep a timm.layers.Format member: refused as "not a network layer" before."""
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3).eval()
    path = tmp_path / "vit.pt"
    torch.save({"model": vit, "run_id": "r"}, path)
    assert "timm.layers.format.Format" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_model(path)["model"](images), vit(images))


def test_a_model_folder_that_cannot_be_one_is_refused_before_a_row_is_written(synth, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(HarnessError, match=r"model folder .*a-file/models cannot be used .*; pass another --save-model"):
        run("ce", synth, save_model=str(blocker / "models"))
    with pytest.raises(HarnessError, match=r"--save-model needs a folder, got an empty path"):
        run("ce", synth, save_model="")
    assert Store(synth).list_runs() == []


def test_without_save_model_no_model_is_kept(synth, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    [res] = run("ce", synth)
    assert "model_file" not in Store(synth).get_run(res.run_id).extra and not list(tmp_path.rglob(f"{res.run_id}*"))


def test_download_into_a_data_root_still_to_be_made_is_left_to_the_loader(synth, tmp_path, monkeypatch):
    """torchvision makes the folder it downloads into: `--download --data-root new/` must reach it."""
    from dataclasses import replace

    from harness.registry import DATASETS
    from tests.synthetic import SYNTH_LT, synth_loader

    asked = []

    def loader(spec, root, download, cache=None):
        asked.append((root, download))
        return synth_loader(spec, root, download, cache)

    DATASETS.unregister("synth-lt")
    DATASETS.register("synth-lt", replace(SYNTH_LT, loader=loader))
    new = tmp_path / "new" / "data"
    with pytest.raises(HarnessError, match=r"data root .*new/data is not a directory; .*or add --download"):
        run("ce", synth, data_root=str(new))
    assert asked == []
    [res] = run("ce", synth, data_root=str(new), download=True)
    assert asked == [(new, True)] and Store(synth).get_run(res.run_id).status == "completed"


def test_a_preview_names_the_config_a_run_stores_and_the_runs_already_completed_writing_nothing(synth, tmp_path):
    """`harness run --dry-run`: the config hash it shows is the one the run stores, it makes no store,
    and once a seed has run it names that run (only a completed one of the same config)."""
    from harness.runner import preview

    req = RunRequest(method="ce", dataset="synth-lt", rho=100, preset="quick", seeds=[0, 1], device="cpu",
                     progress=False, settings={"stage1.lr": 0.07})
    before = preview(req)
    assert before.completed == {} and "no results store at" in before.store_missing
    assert not (tmp_path / "results.db").exists() and not (tmp_path / "cache").exists()
    with pytest.raises(HarnessError, match=r"--save-model needs a folder, got an empty path"):   # as the run would
        preview(RunRequest(**{**req.__dict__, "save_model": " "}))
    preview(RunRequest(**{**req.__dict__, "save_model": str(tmp_path / "models")}))
    assert not (tmp_path / "models").exists()   # the run makes it
    [res] = execute(RunRequest(**{**req.__dict__, "seeds": [1]}))
    run(method="ce", url=synth)   # the shipped lr: another config
    after = preview(req)
    assert [c.config_hash() for c in after.configs] == [c.config_hash() for c in before.configs]
    assert Store(synth).get_run(res.run_id).config_hash == after.configs[1].config_hash()
    assert after.completed == {0: [], 1: [res.run_id]} and after.store_missing is None
