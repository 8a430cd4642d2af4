"""The shipped benchmarks.yaml resolves to each official code's recipe, per dataset (DESIGN.md
§2, §3, §3b), and says what it does not follow."""
from pathlib import Path

import pytest

from harness.config import load_benchmarks, resolve
from harness.streaming import INAT2018

DOC = load_benchmarks("benchmarks.yaml")


def recipe(dataset, method, rho):
    return resolve(DOC, method=method, dataset=dataset, rho=rho, seed=0, preset="paper")


def test_decoupling_cifar_stage_2_epochs_and_cosine_stepping():
    crt, lws = recipe("cifar10-lt", "crt", 100).recipe["stage2"], recipe("cifar10-lt", "lws", 100).recipe["stage2"]
    assert (crt["epochs"], lws["epochs"]) == (10, 5)
    for stage in (crt, lws):
        assert stage["schedule"] == {"kind": "cosine", "step_at": "epoch-start"}
        assert (stage["epoch_steps"], stage["per_class"], stage["shuffle_batch"]) == ("floor", 4, True)
    wb = recipe("cifar100-lt", "wb", 100).recipe
    assert wb["stage1"]["schedule"]["step_at"] == wb["stage2"]["schedule"]["step_at"] == "epoch-start"


def test_inaturalist_recipes():
    crt = recipe("inat2018", "crt", 500)
    assert crt.recipe["stage1"]["weight_decay"] == crt.recipe["stage2"]["weight_decay"] == 1e-4
    assert crt.recipe["stage2"]["epochs"] == 30 and recipe("inat2018", "lws", 500).recipe["stage2"]["epochs"] == 5
    assert crt.recipe["augmentation"] == "rrc+flip"  # no ColorJitter on iNat
    assert INAT2018.mean == (0.466, 0.471, 0.380) and INAT2018.std == (0.195, 0.194, 0.192)
    fbl = recipe("inat2018", "fbl", 500).recipe
    assert fbl["normalisation"]["mean"] == [0.485, 0.456, 0.406]  # FBL's code keeps ImageNet's statistics


def test_places_recipes():
    for method in ("crt", "lws"):
        stage2 = recipe("places-lt", method, 996).recipe["stage2"]
        assert (stage2["lr"], stage2["batch_size"]) == (0.1, 256)
    ce = recipe("places-lt", "ce", 996)
    assert ce.backbone == "resnet152+pretrained" and ce.recipe["stage1"]["train_only"] == ["body.layer4.2.", "fc."]
    fbl = recipe("places-lt", "fbl", 996).recipe
    assert fbl["stage1"]["schedule"]["steps"] == [[60, 0.1], [80, 0.01]] and not fbl.get("deviations")
    # FBL's resnet152_p + Block: the pretrained trunk without its last block, frozen in eval mode
    stage1 = fbl["stage1"]
    assert (stage1["train_only"], stage1["fresh"], stage1["train_mode_only"]) == \
        (["body.layer4.2.", "fc."], ["body.layer4.2."], ["body.layer4.2."])


def test_fbl_large_benchmark_loop():
    fbl = recipe("imagenet-lt", "fbl", 256)
    stage = fbl.recipe["stage1"]
    assert (stage["epochs"], stage["weight_decay"], stage["lr"], stage["batch_size"]) == (200, 2e-4, 0.2, 512)
    assert stage["schedule"] == {"kind": "warmup-step", "warmup_epochs": 5, "steps": [[120, 0.1], [160, 0.01]]}
    assert fbl.recipe["lambda"] == 150 and fbl.recipe["augmentation"] == "rrc+flip" and fbl.backbone == "resnet50"
    assert recipe("imagenet-lt", "ce", 256).recipe["augmentation"] == "rrc+flip+jitter"


@pytest.mark.parametrize("dataset,rho,variant,beta,gamma", [
    ("cifar10-lt", 100, "focal", 0.9999, 1.0), ("cifar10-lt", 50, "focal", 0.9999, 2.0),
    ("cifar10-lt", 10, "sigmoid", 0.9999, None), ("cifar100-lt", 100, "focal", 0.9, 1.0),
    ("cifar100-lt", 50, "sigmoid", 0.99, None), ("cifar100-lt", 10, "focal", 0.999, 0.5)])
def test_class_balanced_loss_takes_cui_table_2s_best_variant(dataset, rho, variant, beta, gamma):
    r = recipe(dataset, "cb_loss", rho).recipe
    assert (r["variant"], r["beta"]) == (variant, beta) and (gamma is None or r["gamma"] == gamma)
    assert r["stage1"]["schedule"]["warmup_per"] == "step" and r["normalisation"]["mean"] == pytest.approx(128 / 255)


@pytest.mark.parametrize("dataset,rho,head,tail,factor,bn", [
    ("cifar10-lt", 100, 0.3, 0.0, 0.5, "eval"), ("cifar10-lt", 50, 0.2, 0.0, 0.2, "eval"),
    ("cifar10-lt", 10, 0.1, 0.0, 0.2, "eval"), ("cifar100-lt", 100, 0.4, 0.1, 0.2, "train"),
    ("cifar100-lt", 50, 0.3, 0.0, 0.1, "train"), ("cifar100-lt", 10, 0.2, 0.0, 0.1, "train")])
def test_mislas_per_benchmark_settings(dataset, rho, head, tail, factor, bn):
    r = recipe(dataset, "mislas", rho).recipe
    assert (r["smooth_head"], r["smooth_tail"], r["lr_factor"], r["stage2"]["bn_mode"]) == (head, tail, factor, bn)
    assert r["stage2"]["epoch_steps"] == "ceil+1" and r["stage2"]["schedule"]["step_at"] == "epoch-end"
    assert r["stage1"]["schedule"]["steps"] == [[160, 0.1], [180, 0.01]]


@pytest.mark.parametrize("dataset,rho,epochs,warmup", [
    ("cifar10-lt", 100, 520, 32), ("cifar10-lt", 50, 465, 29), ("cifar10-lt", 10, 325, 20),
    ("cifar100-lt", 100, 591, 37), ("cifar100-lt", 50, 520, 32), ("cifar100-lt", 10, 334, 21)])
def test_balms_iterations_become_epochs_per_benchmark(dataset, rho, epochs, warmup):
    """ceil(13000 / ceil(N / 512)) epochs, ceil(800 / ceil(N / 512)) of warm-up."""
    r = recipe(dataset, "balanced_softmax", rho).recipe
    n = {("cifar10-lt", 100): 12406, ("cifar10-lt", 50): 13996, ("cifar10-lt", 10): 20431,
         ("cifar100-lt", 100): 10847, ("cifar100-lt", 50): 12608, ("cifar100-lt", 10): 19573}[(dataset, rho)]
    loader_len = -(-n // 512)
    assert (epochs, warmup) == (-(-13000 // loader_len), -(-800 // loader_len))
    assert (r["stage1"]["epochs"], r["stage1"]["schedule"]["warmup_epochs"]) == (epochs, warmup)
    assert r["augmentation"] == "crop+flip+autoaugment+cutout" and r["stage1"]["epoch_steps"] == "floor"


def test_a_method_without_a_recipe_says_it_borrows_ces():
    r = recipe("imagenet-lt", "focal", 256).recipe
    assert r["deviations"] == ["no recipe for 'focal' on imagenet-lt: CE's recipe is used"]


def test_a_deviation_the_command_line_undoes_is_dropped_from_that_run():
    """WB's official code trains a CIFAR ResNet-34 on the first n_c images per class: a run with
    --backbone resnet34-cifar --generator first no longer claims either difference."""
    def wb(**choices):
        return resolve(DOC, method="wb", dataset="cifar100-lt", rho=100, seed=0, preset="paper", **choices)

    default = wb().recipe["deviations"]
    assert any("ResNet-34" in d for d in default) and any("first n_c" in d for d in default)
    official = wb(backbone="resnet34-cifar", generator="first").recipe["deviations"]
    assert official == [d for d in default if "ResNet-34" not in d and "first n_c" not in d]
    assert len(official) == len(default) - 2
    assert wb(backbone="resnet34-cifar").config_hash() != wb().config_hash()


def test_a_malformed_deviation_is_refused():
    from harness import HarnessError
    from harness.config import check_recipe

    good = resolve(DOC, method="ce", dataset="cifar10-lt", rho=100, seed=0, preset="paper").recipe
    for bad in ([{"unless": {"backbone": "x"}}], [{"text": "t", "unless": {"seed": 0}}], [3]):
        with pytest.raises(HarnessError, match="a deviation is a string or"):
            check_recipe({**good, "deviations": bad}, "here")


@pytest.mark.parametrize("dataset,rho,epochs,wd,head,tail,augmentation", [
    ("imagenet-lt", 256, 180, 5e-4, 0.3, 0.0, "rrc+flip+jitter"), ("inat2018", 500, 200, 1e-4, 0.3, 0.0, "rrc+flip+jitter"),
    ("places-lt", 996, 90, 5e-4, 0.4, 0.1, "rrc+flip+jitter")])
def test_mislas_large_benchmarks_follow_its_configs(dataset, rho, epochs, wd, head, tail, augmentation):
    """config/{imagenet,ina2018,places}: batch 256, mixup 0.2, cosine at the 0-based epoch without
    warm-up; stage 2 with shift_bn and lr_factor 0.05; on Places a fresh bottleneck block on the
    frozen trunk (eval mode in both stages). Its references then give Δ."""
    from harness.report_protocol import Reference, differences, is_comparable

    cfg = recipe(dataset, "mislas", rho)
    r = cfg.recipe
    assert (r["stage1"]["epochs"], r["stage1"]["batch_size"], r["stage1"]["lr"], r["stage1"]["weight_decay"]) == \
        (epochs, 256, 0.1, wd)
    assert r["stage1"]["schedule"] == {"kind": "cosine", "step_at": "epoch-end"} and r["mixup_alpha"] == 0.2
    s2 = r["stage2"]
    assert (s2["epochs"], s2["batch_size"], s2["weight_decay"], s2["bn_mode"], s2["epoch_steps"]) == \
        (10, 256, wd, "train", "ceil+1")
    assert (r["smooth_head"], r["smooth_tail"], r["lr_factor"], r["augmentation"]) == (head, tail, 0.05, augmentation)
    assert not any("CE's recipe is used" in d for d in r.get("deviations", []))
    [ref] = [Reference.from_entry(e) for e in DOC["benchmarks"][dataset]["references"]
             if e["method"] == "mislas" and "variant" not in e]   # the other is its stage 1 alone
    ours = {"backbone": cfg.backbone, "generator": cfg.generator, "epochs": epochs, "augmentation": r["augmentation"]}
    assert is_comparable(differences(ref, ours))
    assert not r.get("deviations")
    places = dataset == "places-lt"
    assert r["stage1"].get("fresh") == r["stage1"].get("train_mode_only") == s2.get("train_mode_only") == \
        (["body.layer4.2."] if places else None)
    assert r["stage1"].get("train_only") == (["body.layer4.2.", "fc."] if places else None)


def test_class_balanced_loss_on_inaturalist_is_cuis_tpu_recipe():
    r = recipe("inat2018", "cb_loss", 500).recipe
    s = r["stage1"]
    assert (s["epochs"], s["batch_size"], s["lr"], s["weight_decay"]) == (90, 1024, 0.4 * 1024 / 256, 1e-4)
    assert s["schedule"] == {"kind": "warmup-step", "warmup_epochs": 5, "warmup_per": "step",
                             "steps": [[30, 0.1], [60, 0.01], [80, 0.001]]}
    assert (r["variant"], r["beta"], r["gamma"], r["decay_batchnorm"]) == ("focal", 0.999, 0.5, False)
    assert r["augmentation"] == "rrc+flip"   # the TPU code's Inception crop and flip, no colour jitter


def test_every_key_the_engine_reads_from_a_stage_is_one_a_recipe_may_hold():
    """check_recipe refuses a stage key nothing reads (a typo); a key the engine learns to read
    must be added there too, or every recipe that sets it is refused."""
    from harness.config import STAGE_KEYS
    from harness.engine import TrainSpec

    assert set(TrainSpec.RECIPE_KEYS) <= STAGE_KEYS


def test_a_copy_of_benchmarks_yaml_records_what_its_recipe_changes_of_the_shipped_one(tmp_path):
    """An ablation's copy: the keys it changes, as "key value (shipped value)"; nothing where a
    recipe is the shipped one, and no part of the config or its hash (a run of an unchanged copy
    is the shipped recipe's run)."""
    from harness.config import with_overrides

    text = Path("benchmarks.yaml").read_text()
    ablation = tmp_path / "ablation.yaml"
    assert text.count("    weight_decay: 5.0e-3\n") == 1   # WB's stage 1 (recipes: wb_stage1)
    ablation.write_text(text.replace("    weight_decay: 5.0e-3\n", "    weight_decay: 1.0e-3\n    nesterov: true\n"))
    copy = tmp_path / "copy.yaml"
    copy.write_text(text)
    args = dict(method="wb", dataset="cifar100-lt", rho=100.0, seed=0, preset="quick", epochs=5)
    shipped = resolve(DOC, **args)
    changed = resolve(load_benchmarks(ablation), **args)
    assert shipped.recipe_changes is None and resolve(load_benchmarks(copy), **args).recipe_changes is None
    assert changed.recipe_changes == ("stage1.nesterov true (shipped —), "
                                      "stage1.weight_decay 0.001 (shipped 0.005)")
    assert resolve(load_benchmarks(ablation), **{**args, "method": "ce"}).recipe_changes is None
    assert "recipe_changes" not in shipped.to_dict()
    assert resolve(load_benchmarks(copy), **args).config_hash() == shipped.config_hash()
    # a tuning trial's values are its study's, not the file's: they leave the record as it was
    assert with_overrides(changed, {"stage2.weight_decay": 0.2}, "wb").recipe_changes == changed.recipe_changes


def test_set_changes_a_recipe_value_and_records_it_as_a_copy_of_benchmarks_yaml_would(tmp_path):
    """--set stage1.weight_decay=1e-3 is the ablation copy above without the copy: the same
    recipe, hash and record; a value of another kind, an unknown key, the stage-1 budget or a
    milestone past its stage is refused before anything runs."""
    from harness import HarnessError
    from harness.config import parse_setting

    assert [parse_setting(t) for t in ("stage1.weight_decay=1e-3", "stage1.nesterov=true", "variant=focal",
                                       "x=[1, 2]")] == \
        [("stage1.weight_decay", 0.001), ("stage1.nesterov", True), ("variant", "focal"), ("x", [1, 2])]
    for bad in ("stage1.weight_decay", "=1", "beta="):
        with pytest.raises(HarnessError, match="--set takes KEY=VALUE"):
            parse_setting(bad)
    args = dict(method="wb", dataset="cifar100-lt", rho=100.0, seed=0, preset="quick", epochs=5)
    text = Path("benchmarks.yaml").read_text()
    ablation = tmp_path / "ablation.yaml"
    ablation.write_text(text.replace("    weight_decay: 5.0e-3\n", "    weight_decay: 1.0e-3\n"))
    by_copy = resolve(load_benchmarks(ablation), **args)
    by_set = resolve(DOC, settings={"stage1.weight_decay": 0.001}, **args)
    assert by_set.recipe == by_copy.recipe and by_set.config_hash() == by_copy.config_hash()
    assert by_set.recipe_changes == by_copy.recipe_changes == "stage1.weight_decay 0.001 (shipped 0.005)"
    on_the_copy = resolve(load_benchmarks(ablation), settings={"stage2.lr": 0.05}, **args)
    assert on_the_copy.recipe_changes == "stage1.weight_decay 0.001 (shipped 0.005), stage2.lr 0.05 (shipped 0.01)"
    for settings, message in [({"stage1.weight_decay": "high"}, "the recipe holds 0.005 there"),
                              ({"stage1.nesterov": 1}, "not in the recipe"),
                              ({"stage1.momentum": True}, "the recipe holds 0.9 there"),
                              ({"stage1.epochs": 10}, "pass --epochs N"),
                              ({"stage1.batch_size": 64.5}, "batch_size must be an integer"),
                              ({"stage1.paper_epochs": 100}, "says what the paper trains"),
                              ({"deviations": []}, "says what the paper trains")]:
        with pytest.raises(HarnessError, match=message):
            resolve(DOC, settings=settings, **args)
    with pytest.raises(HarnessError, match=r"stage1.drw_epoch 7 is not an epoch of stage1.s 0 ... 4"):   # never acts
        resolve(DOC, settings={"stage1.drw_epoch": 7}, **{**args, "method": "ce_drw"})


@pytest.mark.parametrize("dataset,method", [("cifar100-lt", "wb"), ("cifar10-lt", "mislas"), ("fmnist-lt", "cb_loss")])
def test_the_keys_list_recipes_prints_are_the_ones_set_takes(dataset, method):
    """`harness list recipes --dataset D --method M` lists the recipe's keys with their values;
    each (but the stage-1 budget, --epochs') can be --set, and to its own value changes nothing."""
    import json

    from harness.config import recipe_values

    values = dict(recipe_values(DOC, dataset, method))
    assert "deviations" not in values and not any(k.endswith("paper_epochs") for k in values)
    rho = float(DOC["benchmarks"][dataset]["rhos"][0])
    plain = resolve(DOC, method=method, dataset=dataset, rho=rho, seed=0, preset="paper")
    for key, text in values.items():
        if key != "stage1.epochs":
            same = resolve(DOC, method=method, dataset=dataset, rho=rho, seed=0, preset="paper",
                           settings={key: json.loads(text)})
            assert same.config_hash() == plain.config_hash() and same.recipe_changes is None, key


def test_fbl_curriculum_keeps_its_shape_on_a_shorter_budget():
    """Full strength at epoch 190 of 200 (the official T - 10); a preset scales it as it scales the
    schedule's epochs: the quick Fashion-MNIST-LT run reached c = (39/30)^2 = 1.69 in its last
    epoch, against the official run's (199/190)^2 = 1.10."""
    for dataset, rho in (("cifar10-lt", 100), ("cifar100-lt", 100), ("imagenet-lt", 256), ("places-lt", 996)):
        assert recipe(dataset, "fbl", rho).recipe["stage1"]["full_strength_epoch"] == 190
    quick = resolve(DOC, method="fbl", dataset="fmnist-lt", rho=100, seed=0, preset="quick").recipe["stage1"]
    assert (quick["epochs"], quick["full_strength_epoch"]) == (40, 38)


def test_a_preset_runs_every_recipe_for_the_same_fraction_of_its_epochs():
    """Quick on Fashion-MNIST-LT is a fifth of each stage-1 recipe: BALMS's 4,334 epochs (13k
    iterations at batch 512) become 867, not the 40 of the 200-epoch recipes, which left Balanced
    Softmax 80 steps against CE's 400 (top-1 44.6 at 40 epochs, 69.4 at 200, seed 0); stage 2
    runs whole, LWS its own 5 epochs and not cRT's 10."""
    def stages(method, dataset="fmnist-lt", preset="quick"):
        cfg = resolve(DOC, method=method, dataset=dataset, rho=100, seed=0, preset=preset).recipe
        return cfg["stage1"], cfg.get("stage2")

    assert stages("ce")[0]["epochs"] == 40 and stages("wb")[0]["epochs"] == 40
    balms, _ = stages("balanced_softmax")
    assert (balms["epochs"], balms["paper_epochs"], balms["schedule"]["warmup_epochs"]) == (867, 4334, 53)
    assert stages("crt")[1]["epochs"] == 10 and stages("lws")[1]["epochs"] == 5
    # CIFAR's quick: a twentieth of stage 1, a fifth of stage 2
    assert stages("balanced_softmax", "cifar10-lt")[0]["epochs"] == 26   # of 520
    assert (stages("crt", "cifar10-lt")[1]["epochs"], stages("lws", "cifar10-lt")[1]["epochs"]) == (2, 1)
    # --epochs fixes stage 1 for the one method asked, and names its own board
    custom = resolve(DOC, method="balanced_softmax", dataset="fmnist-lt", rho=100, seed=0, preset="quick", epochs=200)
    assert (custom.recipe["stage1"]["epochs"], custom.preset) == (200, "quick-e200")
    same = resolve(DOC, method="balanced_softmax", dataset="fmnist-lt", rho=100, seed=0, preset="quick", epochs=867)
    assert same.preset == "quick"


def test_the_values_a_run_trains_with_name_what_changed_each_written_one():
    """`harness run --dry-run`'s table: every key the run trains with, and beside a value that is not
    the one written for the method, the written one and its cause (the ratio's by_rho, the preset's
    budget, --epochs, --set, the benchmark's default)."""
    from harness.config import trained_values

    def table(**kw):
        settings = kw.pop("settings", {})
        cfg = resolve(DOC, method="mislas", dataset="cifar10-lt", rho=50, seed=0, settings=settings, **kw)
        return {key: (value, written, cause) for key, value, written, cause in trained_values(DOC, cfg, settings)}

    rows = table(preset="quick", settings={"mixup_alpha": 0.5})
    assert rows["smooth_head"] == ("0.2", "0.3", "rho 50") and rows["lr_factor"] == ("0.2", "0.5", "rho 50")
    assert rows["smooth_tail"] == ("0.0", "", "")   # rho 50 writes it, the same as the recipe
    assert rows["mixup_alpha"] == ("0.5", "1.0", "--set")
    assert rows["stage1.epochs"] == ("10", "200", "preset quick")
    assert rows["stage2.epochs"] == ("2", "10", "preset quick")
    assert rows["stage1.schedule.steps"] == ("[[8, 0.1], [9, 0.01]]", "[[160, 0.1], [180, 0.01]]", "preset quick")
    assert rows["stage1.lr"] == ("0.1", "", "")
    assert rows["augmentation"] == ('"crop+flip"', "—", "the benchmark's default")
    assert not any(key == "deviations" or key.endswith("paper_epochs") for key in rows)
    rows = table(preset="paper", epochs=20)
    assert rows["stage1.epochs"] == ("20", "200", "--epochs 20") and rows["stage2.epochs"] == ("10", "", "")
    assert rows["mixup_alpha"] == ("1.0", "", "")
