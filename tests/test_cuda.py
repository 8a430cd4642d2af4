"""The engine on a CUDA device: captured steps against eager ones, resume, concurrent seeds,
after-step hooks, batch transforms and parameter groups inside the CUDA graph (the capture
pitfalls of DESIGN.md §10). Skipped where torch sees no CUDA device;
`bench/gpu_proof.py --step correctness` runs them on one.

Two trainings that should be equal are compared through their parameter updates: under bf16
autocast every convolution and matrix product rounds its inputs to 8 significant bits
(relative 2^-9, about 0.2 %), and kernels may sum in different orders, so equal trainings
agree to within UPDATE_TOLERANCE of the update's size after these few dozen steps. A wrong
learning rate, momentum, sample order or a missed hook moves an update by its own order of
magnitude; each test also shows that a training which should differ (another seed, another
learning-rate scale) is more than CONTROL_SEPARATION away, so the tolerance cannot hide one.
"""
import numpy as np
import pytest
import torch

from harness.augment import AutoAugment, Cutout, Mixup, mixed_loss
from harness.data import LTData
from harness.engine import DeviceData, Trainer, TrainSpec, cross_entropy, fit_many, predict, train
from harness.models import resnet32
from methods.wb import MaxNorm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device; bench/gpu_proof.py --step correctness runs these on one")

UPDATE_TOLERANCE = 2e-2     # relative distance of two parameter updates that should be equal (bf16)
CONTROL_SEPARATION = 0.2    # ... and at least this for two that should not
DEVICE = torch.device("cuda")
CLASSES = 10
BATCH = 32
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def cifar_like(n: int) -> DeviceData:
    """n random 32x32 RGB images in 10 classes, with CIFAR's crop (padding 4) and flip."""
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % CLASSES
    counts = torch.bincount(y, minlength=CLASSES).tolist()
    data = LTData("cuda-test", CLASSES, [str(c) for c in range(CLASSES)], x, y, x[:0], y[:0], x, y, counts)
    return DeviceData(data, MEAN, STD, 4, True, DEVICE)


def resnet(seed: int = 0):
    torch.manual_seed(seed)
    return resnet32(CLASSES).to(DEVICE, memory_format=torch.channels_last)


def spec(**kw) -> TrainSpec:
    """Three epochs whose learning rate changes at every step (per-step warm-up over two
    epochs), then drops tenfold."""
    base = dict(epochs=3, batch_size=BATCH, lr=0.05, momentum=0.9, weight_decay=5e-4,
                schedule={"kind": "warmup-step", "warmup_epochs": 2, "warmup_per": "step", "steps": [[2, 0.1]]})
    return TrainSpec(**{**base, **kw})


def flat_parameters(model) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def update_distance(a, b, start: torch.Tensor) -> float:
    """‖(a − start) − (b − start)‖ / ‖b − start‖: how far training `a`'s update is from `b`'s."""
    update_a, update_b = flat_parameters(a) - start, flat_parameters(b) - start
    return float(torch.linalg.norm(update_a - update_b) / torch.linalg.norm(update_b))


def assert_equal_trainings(model_a, log_a, model_b, log_b, start):
    assert update_distance(model_a, model_b, start) < UPDATE_TOLERANCE
    assert np.allclose(log_a.epoch_loss, log_b.epoch_loss, rtol=UPDATE_TOLERANCE)
    assert log_a.steps == log_b.steps


def eager(**kw) -> TrainSpec:
    return spec(cuda_graphs=False, **kw)


def graph_and_eager(data):
    """The same training captured and eager: (graph model, graph log, eager model, eager log)."""
    graph_model, eager_model = resnet(0), resnet(0)
    graph_log = train(graph_model, data, spec(), seed=3)
    eager_log = train(eager_model, data, eager(), seed=3)
    return graph_model, graph_log, eager_model, eager_log


def test_captured_steps_give_the_parameters_of_eager_steps():
    data = cifar_like(3 * BATCH)   # full batches only: every step is a graph replay
    start = flat_parameters(resnet(0))
    graph_model, graph_log, eager_model, eager_log = graph_and_eager(data)
    assert graph_log.graph == "cuda-graph" and eager_log.graph == "eager"
    assert graph_log.steps == 3 * 3
    assert_equal_trainings(graph_model, graph_log, eager_model, eager_log, start)
    other_seed = resnet(0)
    train(other_seed, data, eager(), seed=4)
    assert update_distance(other_seed, eager_model, start) > CONTROL_SEPARATION


@pytest.mark.parametrize("n,engine", [
    pytest.param(3 * BATCH + 1, "cuda-graph", id="three-replays-then-a-tail-of-one"),
    pytest.param(BATCH - 7, "eager", id="no-full-batch-nothing-captured"),
])
def test_the_tail_batch_runs_eagerly_on_the_parameters_the_graph_updated(n, engine):
    data = cifar_like(n)
    start = flat_parameters(resnet(0))
    graph_model, graph_log, eager_model, eager_log = graph_and_eager(data)
    assert graph_log.graph == engine
    assert graph_log.steps == 3 * -(-n // BATCH)
    assert_equal_trainings(graph_model, graph_log, eager_model, eager_log, start)


class Interrupt(Exception):
    pass


def stop_after(last_epoch: int):
    def progress(epoch, epochs, loss):
        if epoch == last_epoch:
            raise Interrupt
    return progress


def counting_hook():
    """A stateful after-step hook, as WB's MaxNorm is: a device counter it declares."""
    counter = torch.zeros((), dtype=torch.long, device=DEVICE)

    def count():
        counter.add_(1)
    count.state_tensors = lambda: [counter]
    return count, counter


@pytest.mark.parametrize("sampler", ["instance", "class_aware"])
def test_a_resumed_training_equals_an_uninterrupted_one(tmp_path, sampler):
    data = cifar_like(3 * BATCH + 5)
    start = flat_parameters(resnet(0))
    hook, counter = counting_hook()
    whole_model = resnet(0)
    whole_log = train(whole_model, data, spec(epochs=4, sampler=sampler, after_step=hook), seed=3)
    whole_count = int(counter)

    checkpoint = tmp_path / "run.pt"
    interrupted_hook, _ = counting_hook()
    with pytest.raises(Interrupt):   # dies after epoch 1's checkpoint
        fit_many([Trainer(resnet(0), data, spec(epochs=4, sampler=sampler, after_step=interrupted_hook), seed=3)],
                 stop_after(1), [checkpoint])
    hook, counter = counting_hook()
    resumed_model = resnet(0)
    [resumed_log] = fit_many([Trainer(resumed_model, data, spec(epochs=4, sampler=sampler, after_step=hook), seed=3)],
                             checkpoints=[checkpoint])
    assert resumed_log.resumed_from == 2 and resumed_log.graph == "cuda-graph"
    assert_equal_trainings(resumed_model, resumed_log, whole_model, whole_log, start)
    assert int(counter) == whole_count == whole_log.steps   # the hook's counter came back with the checkpoint


def test_concurrent_seeds_equal_sequential_ones():
    data = cifar_like(3 * BATCH + 5)
    start = flat_parameters(resnet(0))
    seeds = (3, 4, 5)
    alone = [resnet(0) for _ in seeds]
    alone_logs = [train(model, data, spec(), seed=seed) for model, seed in zip(alone, seeds)]
    together = [resnet(0) for _ in seeds]
    together_logs = fit_many([Trainer(model, data, spec(), seed=seed) for model, seed in zip(together, seeds)])
    for a, a_log, b, b_log in zip(together, together_logs, alone, alone_logs):
        assert a_log.graph == "cuda-graph"
        assert_equal_trainings(a, a_log, b, b_log, start)
    assert update_distance(together[0], together[1], start) > CONTROL_SEPARATION


def test_evaluating_between_epochs_leaves_the_captured_trainings_as_they_were():
    """`harness tune --prune` evaluates every trial after each epoch, eagerly, between graph
    replays, on each trainer's stream: the trainings (seeds together) must not notice."""
    data = cifar_like(3 * BATCH + 5)
    start = flat_parameters(resnet(0))
    seeds = (3, 4)
    plain = [resnet(0) for _ in seeds]
    plain_logs = fit_many([Trainer(model, data, spec(), seed=seed) for model, seed in zip(plain, seeds)])
    watched, evaluated = [resnet(0) for _ in seeds], []

    def evaluate(i, epoch):
        evaluated.append((i, epoch, predict(watched[i], data, "test").float().mean().item()))

    watched_logs = fit_many([Trainer(model, data, spec(), seed=seed) for model, seed in zip(watched, seeds)],
                            epoch_end=evaluate)
    assert [(i, e) for i, e, _ in evaluated] == [(i, e) for e in range(3) for i in range(2)]
    for a, a_log, b, b_log in zip(watched, watched_logs, plain, plain_logs):
        assert a_log.graph == "cuda-graph" and a.training
        assert_equal_trainings(a, a_log, b, b_log, start)


def head_stage(model, **kw) -> dict:
    """A stage-2 spec's arguments: the classifier alone on a frozen backbone (cRT, LWS, WB)."""
    return dict(params=list(model.fc.parameters()), frozen_backbone=True, **kw)


def test_maxnorm_projects_after_every_captured_step():
    data = cifar_like(3 * BATCH + 5)
    start = flat_parameters(resnet(0))
    trained = {}
    for mode, make_spec in (("graph", spec), ("eager", eager)):
        model = resnet(0)
        cap = MaxNorm(model.fc.weight, 0.1)   # the radius lies inside the spread of the rows' norms
        log = train(model, data, make_spec(**head_stage(model, after_step=cap)), seed=3)
        trained[mode] = model, log, cap
    (graph_model, graph_log, cap), (eager_model, eager_log, _) = trained["graph"], trained["eager"]
    assert graph_log.graph == "cuda-graph"
    assert int(cap.steps) == graph_log.steps   # every replay and the tail, none of the capture's warm-up
    assert int(cap.active_steps) > 0
    assert float(graph_model.fc.weight.detach().norm(dim=1).max()) <= cap.radius * (1 + 1e-5)
    assert_equal_trainings(graph_model, graph_log, eager_model, eager_log, start)


@pytest.mark.parametrize("transforms,loss", [
    pytest.param(lambda: [Mixup(1.0)], mixed_loss(cross_entropy), id="mixup"),
    pytest.param(lambda: [AutoAugment(), Cutout(16)], cross_entropy, id="autoaugment+cutout"),
])
def test_batch_transforms_run_inside_the_graph(transforms, loss):
    data = cifar_like(3 * BATCH + 5)
    start = flat_parameters(resnet(0))
    graph_model = resnet(0)
    graph_log = train(graph_model, data, spec(transforms=transforms(), loss=loss), seed=3)
    eager_model = resnet(0)
    eager_log = train(eager_model, data, eager(transforms=transforms(), loss=loss), seed=3)
    assert graph_log.graph == "cuda-graph"   # "eager (<error> during capture)" when capture failed
    assert_equal_trainings(graph_model, graph_log, eager_model, eager_log, start)
    plain = resnet(0)
    train(plain, data, eager(), seed=3)
    assert update_distance(plain, eager_model, start) > CONTROL_SEPARATION   # the transforms did act


def test_parameter_groups_keep_their_learning_rate_scales_inside_the_graph():
    data = cifar_like(3 * BATCH + 5)
    start = flat_parameters(resnet(0))

    def groups(model, head_scale: float) -> list[dict]:
        # the backbone at learning rate 0 and no weight decay must not move at all
        return [{"params": list(model.body.parameters()), "lr_scale": 0.0, "weight_decay": 0.0},
                {"params": list(model.fc.parameters()), "lr_scale": head_scale}]

    runs = {}
    for mode, make_spec, head_scale in (("graph", spec, 1.0), ("eager", eager, 1.0), ("half", eager, 0.5)):
        model = resnet(0)
        body_before = [p.detach().clone() for p in model.body.parameters()]
        log = train(model, data, make_spec(params=groups(model, head_scale)), seed=3)
        assert all(torch.equal(p, q) for p, q in zip(model.body.parameters(), body_before)), mode
        runs[mode] = model, log
    (graph_model, graph_log), (eager_model, eager_log) = runs["graph"], runs["eager"]
    assert graph_log.graph == "cuda-graph"
    assert_equal_trainings(graph_model, graph_log, eager_model, eager_log, start)
    assert update_distance(runs["half"][0], eager_model, start) > CONTROL_SEPARATION


def test_a_class_aware_stage_on_a_frozen_backbone_is_captured():
    data = cifar_like(3 * BATCH + 5)
    start = flat_parameters(resnet(0))
    trained = {}
    for mode, make_spec in (("graph", spec), ("eager", eager)):
        model = resnet(0)
        trained[mode] = model, train(model, data, make_spec(**head_stage(model, sampler="class_aware",
                                                                         shuffle_batch=True)), seed=3)
    (graph_model, graph_log), (eager_model, eager_log) = trained["graph"], trained["eager"]
    assert graph_log.graph == "cuda-graph"
    assert graph_log.steps == 3 * 3   # class-aware epochs are int(N / batch) full batches
    assert_equal_trainings(graph_model, graph_log, eager_model, eager_log, start)
