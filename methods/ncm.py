"""Nearest class mean (NCM), Kang et al., "Decoupling Representation and Classifier", ICLR
2020, with its `cl2n` features: the CE model's un-augmented training features are centred
by their mean and L2-normalised; a class centroid is the mean of its normalised features
(not renormalised); logit_j = −||x̂ − c_j||²."""
import torch
import torch.nn.functional as F
from torch import nn

from harness.engine import extract_features
from harness.method import Method, RunContext


class NearestClassMean(nn.Module):
    def __init__(self, centre: torch.Tensor, centroids: torch.Tensor):
        super().__init__()
        self.register_buffer("centre", centre)
        self.register_buffer("centroids", centroids)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = F.normalize(feats - self.centre, dim=1)
        return -torch.cdist(x, self.centroids).pow(2)

    def effective_weight(self) -> torch.Tensor:
        return self.centroids


def ncm_head(feats: torch.Tensor, labels: torch.Tensor, num_classes: int) -> NearestClassMean:
    centre = feats.mean(dim=0)
    normed = F.normalize(feats - centre, dim=1)
    sums = torch.zeros(num_classes, feats.shape[1], device=feats.device).index_add_(0, labels, normed)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).unsqueeze(1)
    return NearestClassMean(centre, sums / counts)


class NCM(Method):
    name = "ncm"
    title = "NCM (nearest class mean, cl2n)"
    label = "NCM"
    paper = "Kang et al., Decoupling Representation and Classifier, ICLR 2020"

    def finalize(self, model, ctx: RunContext) -> None:
        data = ctx.data
        model.fc = ncm_head(extract_features(model, data, "train"), data.labels("train"), data.num_classes)

    def probabilities(self, outputs, ctx: RunContext):
        return None   # negative squared distances of unit vectors, not logits: no calibration to measure


METHOD = NCM()
