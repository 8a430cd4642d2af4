"""Data-parallel training (torchrun / DDP) exercised on CPU with gloo and 2 processes."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from harness.store import Store
from tests.test_cli import plugin_env

WORLD = 2


def bn_free_setup():
    """A model without BatchNorm, so that 2 processes x 8 images is exactly 1 x 16."""
    from harness.data import LTData
    from harness.models import Classifier

    torch.manual_seed(0)
    x = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(50) % 3
    data = LTData("t", 3, list("abc"), x, y, x[:0], y[:0], x, y, [17, 17, 16])
    body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return data, Classifier(body, 4, 3)


def train_here(out_path=None):
    from harness.engine import DeviceData, train
    from tests.test_engine import spec_for

    data, model = bn_free_setup()
    dd = DeviceData(data, (0.5,), (0.25,), 1, True, torch.device("cpu"))
    log = train(model, dd, spec_for(epochs=3, batch_size=16), seed=3)
    if out_path is not None and dist.get_rank() == 0:
        torch.save({"state": model.state_dict(), "loss": log.epoch_loss}, out_path)
    return model.state_dict(), log.epoch_loss


def worker(rank, init_file, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        train_here(out_path)
    finally:
        dist.destroy_process_group()


def test_two_processes_train_exactly_like_one(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "pg"), str(tmp_path / "out.pt")), nprocs=WORLD)
    together = torch.load(tmp_path / "out.pt", weights_only=True)
    alone_state, alone_loss = train_here()
    for k, v in alone_state.items():
        assert torch.allclose(together["state"][k], v, atol=1e-5), k
    assert together["loss"] == pytest.approx(alone_loss, rel=1e-5)  # 50 images: the padded last batch


def test_shards_cover_each_global_batch(monkeypatch):
    import harness.distributed as d

    seen = []
    for rank in range(WORLD):
        monkeypatch.setattr(d, "world", lambda rank=rank: (rank, WORLD))
        positions, local = d.shard_positions(21, 8)
        assert local == 4
        seen.append(positions.tolist())
    assert seen == [[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20], [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 0]]
    monkeypatch.setattr(d, "world", lambda: (0, 3))
    with pytest.raises(Exception, match="batch size 8 does not split over 3 processes"):
        d.shard_positions(21, 8)


def test_torchrun_cli_writes_one_row_from_rank_0(tmp_path):
    env, _ = plugin_env(tmp_path)
    env.update(HARNESS_DB=f"sqlite:///{tmp_path / 'r.db'}", HARNESS_CACHE=str(tmp_path / "c"), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "harness.cli", "run", "--method", "crt", "--dataset", "synth-lt", "--rho", "100",
                          "--preset", "quick", "--device", "cpu", "--no-progress"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("| crt ") == 1  # one table, from rank 0
    [row] = Store(env["HARNESS_DB"]).list_runs()
    assert row.status == "completed" and row.extra["world_size"] == 2 and row.device.startswith("2 x ")
    assert sorted(os.listdir(tmp_path / "c" / "stage1"))  # the stage-1 checkpoint, written once
