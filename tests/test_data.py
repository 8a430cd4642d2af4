import numpy as np
import pytest
import torch

from harness import HarnessError
from harness.data import (calibration_error, confidence_bins, group_accuracies, group_calibration_errors, holdout_val, lt_counts,
                          per_class_accuracy, select_lt, shot_group)
from harness.datasets import FMNIST_LT, read_idx


@pytest.mark.parametrize("n_max,classes,rho,total", [
    (500, 100, 100, 10847), (500, 100, 50, 12608), (500, 100, 10, 19573),
    (5000, 10, 100, 12406), (5000, 10, 50, 13996), (5000, 10, 10, 20431),
])
def test_cifar_lt_totals_match_the_papers(n_max, classes, rho, total):
    counts = lt_counts(n_max, classes, rho)
    assert sum(counts) == total
    assert counts[0] == n_max and counts == sorted(counts, reverse=True)


def test_fmnist_profile_populates_all_three_shot_groups():
    counts = lt_counts(FMNIST_LT.n_max, 10, 100)
    assert counts == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    groups = [shot_group(c) for c in counts]
    assert (groups.count("many"), groups.count("medium"), groups.count("few")) == (4, 3, 3)


def test_cifar100_rho100_groups_are_35_35_30():
    groups = [shot_group(c) for c in lt_counts(500, 100, 100)]
    assert (groups.count("many"), groups.count("medium"), groups.count("few")) == (35, 35, 30)


def test_shot_group_boundaries():
    assert [shot_group(n) for n in (101, 100, 20, 19)] == ["many", "medium", "medium", "few"]


def test_rho_below_one_is_rejected():
    with pytest.raises(HarnessError, match="rho must be >= 1"):
        lt_counts(500, 10, 0.5)


def test_rho_one_is_balanced():
    assert lt_counts(500, 10, 1) == [500] * 10


def labels(per_class=50, classes=5):
    # interleaved like a real dataset file
    return np.tile(np.arange(classes), per_class)


def test_ldam_generator_reproduces_ldam_drw_selection():
    y = labels()
    counts = [50, 20, 8, 3, 1]
    picked = select_lt(y, counts, "ldam")
    # LDAM-DRW: np.random.seed(0) once; per class, shuffle that class's indices, keep the head
    np.random.seed(0)
    expected = []
    for c, n in enumerate(counts):
        idx = np.where(y == c)[0]
        np.random.shuffle(idx)
        expected.extend(idx[:n])
    assert picked.tolist() == expected
    assert np.bincount(y[picked]).tolist() == counts


def test_first_generator_keeps_the_first_images_of_each_class():
    y = labels()
    picked = select_lt(y, [3, 2, 1, 1, 1], "first")
    assert picked[:3].tolist() == [0, 5, 10]          # class 0 at positions 0, 5, 10
    assert picked[3:5].tolist() == [1, 6]
    assert not np.array_equal(np.sort(picked), np.sort(select_lt(y, [3, 2, 1, 1, 1], "ldam")))


def test_unknown_generator_errors():
    with pytest.raises(HarnessError, match="known: ldam, first"):
        select_lt(labels(), [1] * 5, "random")


def test_validation_split_is_balanced_and_disjoint_from_training():
    y = labels(per_class=60)
    kept = select_lt(y, lt_counts(50, 5, 10), "ldam")
    val = holdout_val(y, kept, 7)
    assert np.bincount(y[val]).tolist() == [7] * 5
    assert not set(val.tolist()) & set(kept.tolist())
    assert len(set(val.tolist())) == len(val)
    assert np.array_equal(val, holdout_val(y, kept, 7))  # fixed: part of the benchmark


def test_head_class_without_leftovers_gets_what_is_left():
    y = labels(per_class=10)
    kept = select_lt(y, [10, 5, 5, 5, 5], "ldam")  # class 0 keeps all its images
    val = holdout_val(y, kept, 3)
    assert np.bincount(y[val], minlength=5).tolist() == [0, 3, 3, 3, 3]
    assert not set(val.tolist()) & set(kept.tolist())


def test_cifar10_lt_validation_split_sizes():
    y = np.repeat(np.arange(10), 5000)
    kept = select_lt(y, lt_counts(5000, 10, 100), "ldam")
    val = holdout_val(y, kept, 20)
    assert np.bincount(y[val], minlength=10).tolist() == [0] + [20] * 9


def test_class_without_images_is_nan_and_left_out():
    acc = per_class_accuracy(torch.tensor([1, 1]), torch.tensor([1, 2]), 3)
    assert np.isnan(acc[0]) and acc[1] == 1.0 and acc[2] == 0.0
    out = group_accuracies(acc, [500, 50, 5])
    assert out["all"] == pytest.approx(0.5) and out["many"] is None and out["medium"] == 1.0


def test_group_accuracies_empty_group_is_none_not_zero():
    acc = np.array([90.0, 80.0, 70.0])
    out = group_accuracies(acc, [500, 300, 150])  # all many, as CIFAR-10-LT at rho 10
    assert out["all"] == pytest.approx(80.0)
    assert out["many"] == pytest.approx(80.0)
    assert out["medium"] is None and out["few"] is None


def test_per_class_accuracy():
    pred = torch.tensor([0, 1, 1, 2, 0, 2])
    target = torch.tensor([0, 1, 0, 2, 0, 1])
    assert per_class_accuracy(pred, target, 3).tolist() == pytest.approx([2 / 3, 0.5, 1.0])


def test_read_idx_roundtrip(tmp_path):
    import gzip
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + np.array([2, 3, 4], dtype=">i4").tobytes()
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())
    assert np.array_equal(read_idx(path), arr)


# ---------------------------------------------------------------- image folders

def save_images(root, images, mode, suffix=".png"):
    """root/class<c>/<i>.png for a {class: [HxW(xC) uint8 arrays]} mapping."""
    from PIL import Image
    for c, arrays in images.items():
        (root / f"class{c}").mkdir(parents=True)
        for i, a in enumerate(arrays):
            Image.fromarray(a, mode).save(root / f"class{c}" / f"{i}{suffix}")


def test_an_image_folder_decodes_bit_exactly_in_class_and_name_order(tmp_path):
    from harness.datasets import load_image_folder
    rng = np.random.default_rng(0)
    rgb = {c: [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(2 + c)] for c in range(3)}
    save_images(tmp_path / "rgb", rgb, "RGB")
    x, y, classes = load_image_folder(tmp_path / "rgb", channels=3)
    assert classes == ["class0", "class1", "class2"] and y.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    want = np.stack([a for c in range(3) for a in rgb[c]]).transpose(0, 3, 1, 2)
    assert x.dtype == torch.uint8 and np.array_equal(x.numpy(), want)
    grey = {c: [rng.integers(0, 256, (6, 5), dtype=np.uint8)] for c in range(2)}
    save_images(tmp_path / "grey", grey, "L")
    x, _, _ = load_image_folder(tmp_path / "grey", channels=1)
    assert x.shape == (2, 1, 6, 5) and np.array_equal(x[:, 0].numpy(), np.stack([grey[0][0], grey[1][0]]))


def test_a_colour_jpeg_read_as_greyscale_is_its_stored_luma_not_a_conversion_of_rgb(tmp_path):
    from PIL import Image

    from harness.datasets import decode_file
    stripes = np.zeros((16, 16, 3), dtype=np.uint8)
    stripes[:, ::2] = (255, 0, 0)
    stripes[:, 1::2] = (0, 0, 255)   # chroma edges at every column: 4:2:0 upsampling smears them
    Image.fromarray(stripes).save(tmp_path / "s.jpg", quality=75)
    with Image.open(tmp_path / "s.jpg") as img:
        img.draft("YCbCr", img.size)
        luma = np.asarray(img.convert("YCbCr"))[..., 0]
        assert img.mode == "YCbCr"                     # the decoder's own planes, not RGB converted back
    with Image.open(tmp_path / "s.jpg") as img:
        from_rgb = np.asarray(img.convert("RGB").convert("L"))
    grey = decode_file(tmp_path / "s.jpg", channels=1)
    assert grey.shape == (1, 16, 16) and np.array_equal(grey[0].numpy(), luma)
    assert not np.array_equal(luma, from_rgb)          # the choice matters for this image


def test_a_truncated_jpeg_is_a_one_line_error_naming_the_file(tmp_path):
    from harness.datasets import load_image_folder
    save_images(tmp_path, {0: [np.full((32, 32, 3), 90, dtype=np.uint8)]}, "RGB", suffix=".jpg")
    path = tmp_path / "class0" / "0.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(HarnessError, match=r"cannot decode image .*0\.jpg"):
        load_image_folder(tmp_path, channels=3)


def test_a_cifar_download_that_finds_no_network_names_the_archive_to_copy_in(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets

    from harness.datasets import CIFAR10_LT, load_cifar

    class Offline(torchvision.datasets.CIFAR10):
        def __init__(self, root, train=True, download=False):
            raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(HarnessError, match=r"URLError.*; without a network, copy cifar-10-python.tar.gz "
                                           r"\(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz\) into "):
        load_cifar(CIFAR10_LT, tmp_path, download=True)


def test_calibration_error_by_hand():
    """MiSLAS's ECE: 15 equal-width confidence bins; per bin |accuracy - mean confidence|,
    weighted by its images. Two images at confidence 0.9 (bin 14), one right: gap 0.4 twice;
    one at 0.5, right: 0.5; one at 0.3, wrong: 0.3. (0.8 + 0.5 + 0.3) / 4 = 40 %."""
    probs = torch.tensor([[0.9, 0.025, 0.025, 0.025, 0.025],
                          [0.025, 0.9, 0.025, 0.025, 0.025],
                          [0.125, 0.125, 0.5, 0.125, 0.125],
                          [0.3, 0.2, 0.2, 0.15, 0.15]])
    target = torch.tensor([0, 0, 2, 4])
    assert calibration_error(probs, target) == pytest.approx(40.0)
    # images of one bin pool their accuracy: 0.91 and 0.88 are both in (0.867, 0.933]
    pooled = torch.tensor([[0.91, 0.09], [0.12, 0.88]])
    assert calibration_error(pooled, torch.tensor([0, 0])) == pytest.approx(abs(0.5 - 0.895) * 100)
    assert calibration_error(probs[:0], target[:0]) is None


def test_confidence_bins_are_the_reliability_diagram_and_ece_is_their_weighted_gap():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.92, 0.03], [0.5, 0.25, 0.25], [0.34, 0.33, 0.33]])
    target = torch.tensor([0, 0, 0, 2])
    bins = confidence_bins(probs, target)
    # 0.9 and 0.92 share (0.867, 0.933], bin 14; 0.5 is bin 8's right edge (closed there); 0.34, bin 6
    assert [(b.index, b.images) for b in bins] == [(6, 1), (8, 1), (14, 2)]
    assert [b.accuracy for b in bins] == [0.0, 1.0, 0.5]
    assert bins[2].confidence == pytest.approx(0.91) and bins[1].centre == pytest.approx(7.5 / 15)
    assert calibration_error(probs, target) == pytest.approx((0.34 + 0.5 + 2 * 0.41) / 4 * 100)


def test_calibration_error_per_shot_group_takes_the_images_of_its_classes():
    counts = [500, 50, 5]   # many, medium, few
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    target = torch.tensor([0, 1, 2, 2])
    ece = group_calibration_errors(probs, target, counts)
    assert ece["many"] == pytest.approx(10.0)              # right at 0.9
    assert ece["medium"] == pytest.approx(60.0)            # wrong at 0.6
    assert ece["few"] == pytest.approx((70 + 20) / 2)      # wrong at 0.7, right at 0.8: bins apart
    assert ece["all"] == pytest.approx((10 + 60 + 70 + 20) / 4)
    assert group_calibration_errors(probs[:1], target[:1], counts)["few"] is None
