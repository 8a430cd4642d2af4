"""Backbones: a feature extractor `body` and a linear classifier `fc`.

Every model exposes `features(x)` and `fc` so that methods can freeze, swap or
re-scale the classifier without knowing the backbone.
"""
from __future__ import annotations

import enum
import importlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness import HarnessError


class Classifier(nn.Module):
    def __init__(self, body: nn.Module, feat_dim: int, num_classes: int):
        super().__init__()
        self.body = body
        self.feat_dim = feat_dim
        self.fc: nn.Module = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def head_weight(head: nn.Module) -> torch.Tensor:
    """The class-by-feature weight a head effectively applies (for weight-norm plots)."""
    effective = getattr(head, "effective_weight", None)
    return effective() if callable(effective) else head.weight


# ---------------------------------------------------------------- ResNet-32 (LDAM-DRW)

class BasicBlockA(nn.Module):
    """Basic block with the option-A shortcut: spatial subsample + zero-padded channels."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else 0
        self.stride = stride

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad == 0 and self.stride == 1:
            return x
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifarBody(nn.Module):
    def __init__(self, blocks_per_stage: int = 5, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                layers.append(BasicBlockA(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def kaiming_init(model: nn.Module) -> None:
    # LDAM-DRW's _weights_init: Kaiming-normal for every conv and linear weight.
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)


def resnet32(num_classes: int, in_channels: int = 3) -> Classifier:
    model = Classifier(ResNetCifarBody(5, in_channels), 64, num_classes)
    kaiming_init(model)
    return model


# ---------------------------------------------------------------- CIFAR ResNet-34 (weight balancing)

def resnet34_cifar(num_classes: int, in_channels: int = 3) -> Classifier:
    from torchvision.models import resnet34

    net = resnet34(num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    fc = net.fc
    net.fc = nn.Identity()
    model = Classifier(net, 512, num_classes)
    model.fc = fc
    return model


# ---------------------------------------------------------------- small CNN for 28x28 images

def fmnist_cnn(num_classes: int, in_channels: int = 1) -> Classifier:
    """Three conv-BN-ReLU stages (32/64/128, strides 1/2/2) and global pooling: ~0.1 M
    parameters, cheap enough that the six-method demo runs in minutes on two cores."""
    def stage(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    body = nn.Sequential(*stage(in_channels, 32, 1), *stage(32, 64, 2), *stage(64, 128, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = Classifier(body, 128, num_classes)
    kaiming_init(model)
    return model


# ---------------------------------------------------------------- large backbones from timm

TIMM_BACKBONES = ("resnext50_32x4d", "resnet50", "resnet152")  # DESIGN.md §2; any other as "timm:<name>"
PRETRAINED = "+pretrained"


def timm_model(name: str, num_classes: int, in_channels: int) -> Classifier:
    """A timm network as the body (its own classifier removed, pooled features out).
    `<name>+pretrained` loads weights the user has locally: $HARNESS_WEIGHTS/<name>.pth
    or .safetensors (default folder ./weights). Never a download at run time."""
    import timm

    arch, pretrained = name.removeprefix("timm:").removesuffix(PRETRAINED), name.endswith(PRETRAINED)
    try:
        body = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_channels)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise HarnessError(f"unknown timm backbone '{arch}': {exc}") from exc
    if pretrained:
        load_local_weights(body, arch)
    model = Classifier(body, body.num_features, num_classes)
    return model


def load_local_weights(body: nn.Module, arch: str) -> None:
    weights_dir = Path(os.environ.get("HARNESS_WEIGHTS", "weights"))
    for path in (weights_dir / f"{arch}.pth", weights_dir / f"{arch}.safetensors"):
        if path.is_file():
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier.", "head."))}
            missing, _ = body.load_state_dict(state, strict=False)
            if missing:
                raise HarnessError(f"{path} does not fit {arch}: missing {missing[:3]}...")
            return
    raise HarnessError(f"pretrained weights for {arch} are not on this machine: put {arch}.pth or "
                       f"{arch}.safetensors in {weights_dir}/ (or set HARNESS_WEIGHTS); the harness never "
                       "downloads weights at run time")


# ---------------------------------------------------------------- a saved model, read back

LAYER_PACKAGES = ("torch", "timm", "harness", "methods")   # where load_model may import a layer's class from


def load_model(path: str | os.PathLike) -> dict:
    """A model file of `--save-model` ({"model", "run_id", "config", "class_names", "inputs"}),
    read with torch's weights-only unpickler: it builds tensors, plain containers and the network
    layers (nn.Module classes) the file names, with the enum members they hold as settings (timm's
    ViT and Swin keep a `Format` one), and nothing else. A layer's class comes from torch, timm, the
    harness or its methods, or from a module already imported (a plugin method's own head: import
    its package first); a file naming anything else is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"no model file at {path}; `harness show RUN_ID` names a run's (extra.model_file)")
    layers = []
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(path):
        module_name, _, attr = name.rpartition(".")
        module = sys.modules.get(module_name)
        if module is None and module_name.split(".")[0] in LAYER_PACKAGES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                pass
        layer = getattr(module, attr, None)
        # An enum member unpickles as a lookup of its value, no code of the file's choosing.
        if not (isinstance(layer, type) and issubclass(layer, (nn.Module, enum.Enum))):
            raise HarnessError(f"{path} names {name}, not a network layer of torch, timm, the harness or an imported "
                               "package: not loaded (torch.load(path, weights_only=False) runs what it names: only "
                               "for a file you trust)")
        layers.append(layer)
    with torch.serialization.safe_globals(layers):
        return torch.load(path, map_location="cpu", weights_only=True)


BACKBONES = {"resnet32": resnet32, "resnet34-cifar": resnet34_cifar, "fmnist-cnn": fmnist_cnn}


def check_backbone(name: str) -> None:
    base = name.removesuffix(PRETRAINED)
    if not (name in BACKBONES or base in TIMM_BACKBONES or base.startswith("timm:")):
        raise HarnessError(f"unknown backbone '{name}'; known backbones: {', '.join(sorted(BACKBONES))}, "
                           f"{', '.join(TIMM_BACKBONES)} (+pretrained), timm:<any timm model>")


def under(name: str, prefixes) -> bool:
    """Whether a dotted module or parameter name lies under one of the name prefixes:
    "body.layer4.2." holds the block "body.layer4.2" and everything inside it."""
    return f"{name}.".startswith(tuple(prefixes))


def modules_under(model: nn.Module, prefixes: list[str], key: str) -> list[nn.Module]:
    """The modules under `prefixes`; a recipe `key` naming none is an error, not a no-op."""
    modules = [m for name, m in model.named_modules() if under(name, prefixes)]
    if not modules:
        raise HarnessError(f"{key} {list(prefixes)} names no module of the model")
    return modules


def reinitialise(model: nn.Module, prefixes: list[str] | None) -> None:
    """Give the modules under `prefixes` PyTorch's default initialisation (BatchNorm: weight 1,
    bias 0, statistics reset): a fresh block in place of a pretrained one, as the official
    MiSLAS and FBL Places-LT codes build theirs (a standalone Bottleneck on a trunk without it)."""
    for module in modules_under(model, prefixes, "fresh") if prefixes else []:
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def build_model(name: str, num_classes: int, in_channels: int) -> Classifier:
    check_backbone(name)
    if name in BACKBONES:
        return BACKBONES[name](num_classes, in_channels)
    return timm_model(name, num_classes, in_channels)
