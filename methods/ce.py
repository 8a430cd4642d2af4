"""Plain cross-entropy with instance-balanced sampling: the baseline every method reports against."""
from harness.method import Method


class CrossEntropy(Method):
    name = "ce"
    title = "Cross-entropy (CE)"
    label = "CE"
    paper = "baseline; recipe of Cao et al., LDAM-DRW, NeurIPS 2019"


METHOD = CrossEntropy()
