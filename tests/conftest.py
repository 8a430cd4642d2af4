import pytest
import torch

from harness.registry import DATASETS
from tests.synthetic import BENCHMARKS_YAML, SYNTH_LT

torch.set_num_threads(2)


@pytest.fixture
def synth(tmp_path, monkeypatch):
    """Register the synthetic dataset and point the harness at a temporary store,
    cache and benchmarks file. Yields the store URL."""
    bench = tmp_path / "benchmarks.yaml"
    bench.write_text(BENCHMARKS_YAML)
    monkeypatch.setenv("HARNESS_BENCHMARKS", str(bench))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    url = f"sqlite:///{tmp_path / 'results.db'}"
    monkeypatch.setenv("HARNESS_DB", url)
    DATASETS.register("synth-lt", SYNTH_LT)
    yield url
    DATASETS.unregister("synth-lt")
