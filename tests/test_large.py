"""Large benchmarks on a miniature: an ImageNet-LT-shaped tree with split lists in the
real format, streamed through DataLoader workers into a small timm model; folder-lt."""
import re
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from harness import HarnessError
from harness.registry import DATASETS
from harness.runner import RunRequest, execute
from harness.store import Store
from harness.streaming import FOLDER_LT, ListDatasetSpec

COUNTS = [24, 12, 6, 3]  # many / medium / few need > 100 ... so: all "medium"/"few" here; the ratio is 8
CLASSES = len(COUNTS)


def write_images(root, rel_paths, label_of, size=20):
    rng = np.random.RandomState(0)
    for rel in rel_paths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        base = 60 * label_of[rel]
        pixels = np.clip(base + rng.randint(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, "JPEG")


def mini_imagenet_lt(root):
    """Images under train/ and val/ plus ImageNet_LT_{train,val,test}.txt in the OLTR format."""
    lists, label_of = {"train": [], "val": [], "test": []}, {}
    for c, n in enumerate(COUNTS):
        for split, k in (("train", n), ("val", 2), ("test", 3)):
            folder = "train" if split == "train" else "val"
            for i in range(k):
                rel = f"{folder}/n{c:08d}/n{c:08d}_{split}{i}.JPEG"
                lists[split].append(f"{rel} {c}")
                label_of[rel] = c
    write_images(root, label_of, label_of)
    for split, lines in lists.items():
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


MINI = ListDatasetSpec(
    name="mini-imagenet-lt", title="Mini-ImageNet-LT", num_classes=CLASSES,
    lists={"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"},
    expected={"train": sum(COUNTS), "val": 2 * CLASSES, "test": 3 * CLASSES}, backbone="timm:resnet10t",
    source="generated in the tests", size=16, resize=18, workers=0)

BENCH = textwrap.dedent("""
    version: 1
    recipes:
      one: &one {epochs: 1, batch_size: 8, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4,
                 schedule: {kind: cosine, step_at: epoch-start}}
      two: &two {epochs: 1, batch_size: 8, lr: 0.05, momentum: 0.9, weight_decay: 0.1,
                 schedule: {kind: cosine, step_at: epoch-start}}
    mini_methods: &mini
      ce: {stage1: *one}
      crt: {stage1: *one, stage2: *one}
      lws: {stage1: *one, stage2: *one}
      tau_norm: {stage1: *one}
      fbl: {stage1: *one, lambda: 150}
      wb: {stage1: {<<: *one, weight_decay: 5.0e-3}, stage2: *two, beta: 0.9999, maxnorm_thresh: 0.1}
      ce_drw: {stage1: {<<: *one, drw_epoch: 0}, beta: 0.9999}
      ldam_drw: {stage1: {<<: *one, drw_epoch: 0}, beta: 0.9999, max_margin: 0.3, scale: 30}
      focal: {stage1: *one, gamma: 1.0}
      cb_loss: {stage1: *one, variant: focal, beta: 0.9999, gamma: 1.0}
      logit_adjust: {stage1: *one, tau: 1.0}
      balanced_softmax: {stage1: {<<: *one, epoch_steps: floor}, augmentation: rrc+flip}
      la_posthoc: {stage1: *one}
      ncm: {stage1: *one}
      mislas: {stage1: *one, mixup_alpha: 0.2, stage2: {<<: *one, epoch_steps: ceil+1, bn_mode: train},
               smooth_head: 0.3, smooth_tail: 0.0, lr_factor: 0.05}
    benchmarks:
      mini-imagenet-lt:
        rhos: [natural]
        backbone: timm:resnet10t
        metric: top1
        generator: natural
        methods: *mini
        references:
          - {method: ce, rho: 8, top1: 44.4, source: "shape of a real reference",
             protocol: {backbone: resnext50_32x4d, generator: natural, epochs: 90, augmentation: rrc+flip+jitter}}
      folder-lt:
        rhos: [natural]
        backbone: timm:resnet10t
        metric: top1
        generator: ldam
        val_per_class: 2
        methods: *mini
""")


@pytest.fixture
def large(tmp_path, monkeypatch):
    bench = tmp_path / "benchmarks.yaml"
    bench.write_text(BENCH)
    monkeypatch.setenv("HARNESS_BENCHMARKS", str(bench))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HARNESS_DB", f"sqlite:///{tmp_path / 'results.db'}")
    DATASETS.register("mini-imagenet-lt", MINI)
    yield mini_imagenet_lt(tmp_path / "imagenet"), f"sqlite:///{tmp_path / 'results.db'}"
    DATASETS.unregister("mini-imagenet-lt")


def run(method, root, dataset="mini-imagenet-lt", rho="natural"):
    return execute(RunRequest(method=method, dataset=dataset, rho=rho, data_root=str(root), device="cpu",
                              progress=False))


@pytest.mark.parametrize("method", ["ce", "crt", "lws", "tau_norm", "fbl", "wb", "ce_drw", "ldam_drw", "focal",
                                    "cb_loss", "logit_adjust", "balanced_softmax", "la_posthoc", "ncm", "mislas"])
def test_every_method_runs_a_step_on_the_miniature(large, method):
    root, url = large
    [res] = run(method, root)
    row = Store(url).get_run(res.run_id)
    assert row.status == "completed" and row.rho == 8.0 and row.generator == "natural"
    assert row.backbone == "timm:resnet10t"
    assert [c.train_count for c in sorted(row.class_metrics, key=lambda c: c.class_index)] == COUNTS
    test = {m.group: m for m in row.metrics if m.split == "test"}
    assert {g: test[g].n_classes for g in test} == {"all": 4, "many": 0, "medium": 1, "few": 3}
    assert test["many"].top1 is None  # empty group stays empty
    assert {m.split for m in row.metrics} == {"test", "val"}  # the release's val list is used


def test_streamed_epochs_are_reproducible(large):
    root, url = large
    [a] = run("ce", root)
    for path in (root.parent / "cache").rglob("*.pt"):
        path.unlink()  # no stage-1 cache: train again from the same seed
    [b] = run("ce", root)
    assert not b.stage1_cached and a.metrics == b.metrics


@pytest.mark.parametrize("damage,message", [
    (lambda r: (r / "ImageNet_LT_val.txt").unlink(), "split list"),
    (lambda r: (r / "ImageNet_LT_test.txt").write_text("val/x.JPEG 0\n"), "lists 1 images, the release has 12"),
    (lambda r: next((r / "train").rglob("*.JPEG")).unlink(), "train images listed in ImageNet_LT_train.txt are missing"),
    (lambda r: (r / "ImageNet_LT_train.txt").write_text("no label here\n"), "line 1: expected 'relative/path label'"),
])
def test_broken_release_is_a_clear_error(large, damage, message):
    root, url = large
    damage(root)
    with pytest.raises(HarnessError, match=message):
        run("ce", root)
    assert not (root.parent / "results.db").exists() or Store(url).list_runs() == []


def test_a_fixed_tail_refuses_a_ratio(large):
    root, _ = large
    with pytest.raises(HarnessError, match="fixed long tail"):
        run("ce", root, rho=100.0)


def folder_tree(root, train_counts, test_per_class=2):
    label_of = {}
    for c, n in enumerate(train_counts):
        for split, k in (("train", n), ("test", test_per_class)):
            for i in range(k):
                label_of[f"{split}/class{c}/{i}.jpg"] = c
    write_images(root, label_of, label_of, size=24)
    return root


def test_folder_lt_natural_and_cut_to_a_ratio(large, tmp_path):
    root = folder_tree(tmp_path / "folder", [30, 20, 30])
    [natural] = run("ce", root, dataset="folder-lt")
    row = Store(large[1]).get_run(natural.run_id)
    assert row.generator == "natural" and row.rho == 1.5
    assert [c.train_count for c in sorted(row.class_metrics, key=lambda c: c.class_index)] == [30, 20, 30]
    assert {m.split for m in row.metrics} == {"test"}  # natural counts: no images left for a validation split
    [cut] = run("crt", root, dataset="folder-lt", rho=4.0)  # n_max = the smallest class (20): 20, 10, 5
    row = Store(large[1]).get_run(cut.run_id)
    assert [c.train_count for c in sorted(row.class_metrics, key=lambda c: c.class_index)] == [20, 10, 5]
    val = {m.group: m.n_classes for m in row.metrics if m.split == "val"}
    assert val["all"] == 3
    assert FOLDER_LT.workers >= 1  # this spec decodes in DataLoader worker processes
    assert natural.extra["data_name"] == cut.extra["data_name"] == FOLDER_LT.build(4.0, "ldam", 20, root).data_name


def test_an_image_folder_is_named_by_its_folder_and_files_wherever_it_lies(tmp_path):
    """What keeps two folders' runs on two boards: the same files elsewhere are the same data,
    one more image is other data."""
    here = folder_tree(tmp_path / "a" / "birds", [30, 20, 30])
    name = FOLDER_LT.build(4.0, "ldam", 2, here).data_name
    assert re.fullmatch(r"birds [0-9a-f]{8}", name)
    assert FOLDER_LT.build(2.0, "ldam", 0, here).data_name == name   # another cut of the same folder
    moved = folder_tree(tmp_path / "b" / "birds", [30, 20, 30])
    assert FOLDER_LT.build(4.0, "ldam", 2, moved).data_name == name
    # the provenance checksum, of the lists the run sees, too; another validation split is another
    checksum = FOLDER_LT.build(4.0, "ldam", 2, here).checksum()
    assert FOLDER_LT.build(4.0, "ldam", 2, moved).checksum() == checksum
    assert FOLDER_LT.build(4.0, "ldam", 1, here).checksum() != checksum
    grown = folder_tree(tmp_path / "c" / "birds", [30, 21, 30])
    assert FOLDER_LT.build(4.0, "ldam", 2, grown).data_name != name


def test_a_releases_checksum_is_of_its_split_lists_wherever_it_lies(tmp_path):
    here, there = mini_imagenet_lt(tmp_path / "a"), mini_imagenet_lt(tmp_path / "b")
    rho = MINI.natural_rho(here)
    checksum = MINI.build(rho, "natural", 0, here).checksum()
    assert MINI.build(rho, "natural", 0, there).checksum() == checksum
    test_list = there / "ImageNet_LT_test.txt"
    test_list.write_text("\n".join(reversed(test_list.read_text().splitlines())) + "\n")   # another list
    assert MINI.build(rho, "natural", 0, there).checksum() != checksum


def test_folder_lt_stage1_learns_from_the_training_list_whichever_validation_split(tmp_path):
    """The stage-1 cache key reads the training list: the same for any --val-per-class, another
    for other training images."""
    root = folder_tree(tmp_path / "folder", [30, 20, 30])
    held, none = (FOLDER_LT.build(4.0, "ldam", per_class, root) for per_class in (2, 0))
    assert held.val and not none.val and held.checksum() != none.checksum()
    assert held.training_checksum() == none.training_checksum()
    assert FOLDER_LT.build(4.0, "first", 2, root).training_checksum() != held.training_checksum()


def test_folder_lt_refuses_a_class_without_images_before_training(large, tmp_path):
    """An empty class folder, or a ratio whose tail keeps int(n_max / rho) = 0 images, made
    a class with no accuracy (and a traceback from the counting): both are named up front."""
    root = folder_tree(tmp_path / "folder", [6, 3, 4])
    [f.unlink() for f in (root / "test" / "class2").iterdir()]
    with pytest.raises(HarnessError, match=r"class folder .*test/class2 holds no image files; add images or remove"):
        run("ce", root, dataset="folder-lt")
    [f.unlink() for f in (root / "train" / "class2").iterdir()]
    with pytest.raises(HarnessError, match=r"class folder .*train/class2 holds no image files; add"):
        run("ce", root, dataset="folder-lt")
    (root / "train" / "class2").rmdir(), (root / "test" / "class2").rmdir()
    with pytest.raises(HarnessError, match="rho 4 leaves the tail classes of folder-lt at .* without a training "
                                           r"image; the largest rho it allows is 3 \(n_max 3\)"):
        run("ce", root, dataset="folder-lt", rho=4.0)   # n_max = the smallest class (3): 3, int(0.75)
    assert not (tmp_path / "results.db").exists()


def test_folder_lt_skips_files_that_are_no_images_and_names_one_it_cannot_decode(large, tmp_path):
    """A .DS_Store beside the images was a sample, and the run died in a DataLoader worker with
    PIL's traceback; now files are images by their extension (as ImageFolder's), and an image
    that does not decode fails the run with one line naming it."""
    root = folder_tree(tmp_path / "folder", [6, 3])
    (root / "train" / "class0" / ".DS_Store").write_bytes(b"\0\1 finder junk")
    (root / "test" / "class1" / "notes.txt").write_text("where these came from")
    [res] = run("ce", root, dataset="folder-lt")
    row = Store(large[1]).get_run(res.run_id)
    assert row.status == "completed"
    assert [c.train_count for c in sorted(row.class_metrics, key=lambda c: c.class_index)] == [6, 3]
    (root / "train" / "class1" / "9.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(HarnessError) as caught:
        run("ce", root, dataset="folder-lt")
    line = f"cannot decode image {root / 'train' / 'class1' / '9.jpg'}: cannot identify image file"
    assert str(caught.value).startswith(line) and str(caught.value).endswith("; replace or remove it")
    assert "\n" not in str(caught.value)   # the worker's traceback is not the message
    [failed] = [r for r in Store(large[1]).list_runs() if r.status == "failed"]
    assert failed.error.startswith(f"UnreadableImage: {line}")


def test_a_class_name_the_store_cannot_keep_is_refused_before_training(large, tmp_path):
    """PostgreSQL and MySQL refuse a class name longer than the column when the run completes,
    which lost the training; every store now refuses it up front, and nothing is written."""
    root = folder_tree(tmp_path / "folder", [6, 3])
    long_name = "x" * 129
    for split in ("train", "test"):
        (root / split / "class1").rename(root / split / long_name)
    with pytest.raises(HarnessError, match="is 129 characters; the results store keeps up to 128: rename"):
        run("ce", root, dataset="folder-lt")
    assert not (tmp_path / "results.db").exists()
    for split in ("train", "test"):
        (root / split / long_name).rename(root / split / long_name[:128])
    [res] = run("ce", root, dataset="folder-lt")
    assert long_name[:128] in [c.class_name for c in Store(large[1]).get_run(res.run_id).class_metrics]


def test_pretrained_weights_are_never_downloaded(tmp_path, monkeypatch):
    from harness.models import build_model

    monkeypatch.setenv("HARNESS_WEIGHTS", str(tmp_path / "none"))
    with pytest.raises(HarnessError, match="not on this machine: put resnet10t.pth or resnet10t.safetensors in"):
        build_model("timm:resnet10t+pretrained", 3, 3)
    body = build_model("timm:resnet10t", 3, 3).body
    (tmp_path / "w").mkdir()
    torch.save({k: v + 1 for k, v in body.state_dict().items() if v.is_floating_point()} |
               {k: v for k, v in body.state_dict().items() if not v.is_floating_point()},
               tmp_path / "w" / "resnet10t.pth")
    monkeypatch.setenv("HARNESS_WEIGHTS", str(tmp_path / "w"))
    loaded = build_model("timm:resnet10t+pretrained", 3, 3).body
    key = next(k for k, v in body.state_dict().items() if v.is_floating_point())
    assert torch.equal(loaded.state_dict()[key], body.state_dict()[key] + 1)


def test_which_runs_have_a_validation_split():
    """The release's val list at the natural ratio (iNat has none: its val images are its test
    set), else the images held out per class of those a profile left."""
    from harness.datasets import CIFAR10_LT
    from harness.streaming import IMAGENET_LT, INAT2018

    assert IMAGENET_LT.holds_validation("natural", 0) and not INAT2018.holds_validation("natural", 20)
    assert not FOLDER_LT.holds_validation("natural", 20) and FOLDER_LT.holds_validation("ldam", 2)
    assert CIFAR10_LT.holds_validation("ldam", 20) and not CIFAR10_LT.holds_validation("ldam", 0)


def test_tuning_without_a_validation_split_at_the_natural_ratio_is_refused_before_a_trial(large, tmp_path):
    """It trained a whole trial (hours at iNat's size) before failing on the missing val top-1."""
    from harness.tune import TuneRequest, tune

    root = folder_tree(tmp_path / "folder", [6, 3, 4])
    req = TuneRequest(run=RunRequest(method="wb", dataset="folder-lt", rho="natural", data_root=str(root),
                                     device="cpu", progress=False), trials=1)
    with pytest.raises(HarnessError, match=r"validation split, and Image folder \(LT\) at --rho natural has none"):
        tune(req, report=lambda line: None)
    assert not (tmp_path / "results.db").exists()


def test_a_run_on_one_image_folder_is_not_done_for_another(large, tmp_path):
    """sweep and run --dry-run find a config's completed runs on this folder only: before, one
    folder's runs made a sweep of another skip its seeds as done."""
    from harness.runner import preview
    from harness.sweep import plan

    first = folder_tree(tmp_path / "a" / "folder", [30, 20, 30])
    other = folder_tree(tmp_path / "b" / "folder", [30, 21, 30])
    [done] = run("ce", first, dataset="folder-lt", rho=4.0)
    for root, skipped, completed in [(first, [0], [done.run_id]), (other, [], [])]:
        base = RunRequest(method="ce", dataset="folder-lt", rho=4.0, data_root=str(root), device="cpu", progress=False)
        [planned] = plan(base, methods=["ce"], datasets=["folder-lt"], rhos=[4.0], seeds=[0])
        assert planned.skipped_seeds == skipped and planned.request.seeds == [0][len(skipped):]
        assert preview(base).completed == {0: completed}


def test_tuning_on_two_image_folders_makes_two_studies(large, tmp_path):
    """A study's trials are of one folder: before, a second folder's search resumed the first's."""
    from harness.tune import TuneRequest, search_space, study_name

    def name(root):
        req = TuneRequest(run=RunRequest(method="wb", dataset="folder-lt", rho=4.0, data_root=str(root), device="cpu",
                                         progress=False), trials=1)
        return study_name(req, search_space(req))

    first = name(folder_tree(tmp_path / "a" / "folder", [30, 20, 30]))
    assert name(folder_tree(tmp_path / "b" / "folder", [30, 20, 30])) == first   # the same files elsewhere
    assert name(folder_tree(tmp_path / "c" / "folder", [30, 21, 30])) != first


def test_a_saved_folder_lt_model_names_the_resizing_its_inputs_take(large, tmp_path):
    from harness.streaming import transforms_for

    root = folder_tree(tmp_path / "folder", [30, 20, 30])
    [res] = execute(RunRequest(method="crt", dataset="folder-lt", rho="natural", data_root=str(root), device="cpu",
                               progress=False, save_model=str(tmp_path / "models")))
    from harness.models import load_model

    saved = load_model(tmp_path / "models" / f"{res.run_id}.pt")   # a timm body's layers among them
    inputs = saved["inputs"]
    assert (inputs["mean"], inputs["std"]) == (list(FOLDER_LT.mean), list(FOLDER_LT.std))
    assert f"Resize({FOLDER_LT.resize}), CenterCrop({FOLDER_LT.size})" in inputs["pixels"]
    to_input = transforms_for(FOLDER_LT, False, mean=inputs["mean"], std=inputs["std"])
    with torch.no_grad():
        predicted = {c: [saved["model"](to_input(Image.open(root / f"test/class{c}/{i}.jpg").convert("RGB"))[None])
                         .argmax(1).item() for i in range(2)] for c in range(3)}
    stored = sorted(Store(large[1]).get_run(res.run_id).class_metrics, key=lambda c: c.class_index)
    assert [50.0 * sum(p == c for p in predicted[c]) for c in range(3)] == [c.accuracy for c in stored]
