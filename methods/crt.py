"""Classifier re-training (cRT), Kang et al., "Decoupling Representation and Classifier
for Long-Tailed Recognition", ICLR 2020: freeze the CE backbone, re-initialise the
linear classifier and train it with class-aware sampling."""
from harness.engine import TrainSpec
from harness.method import Method, RunContext, reinit_linear, stage2_spec


class ClassifierRetraining(Method):
    name = "crt"
    title = "cRT (classifier re-training)"
    label = "cRT"
    paper = "Kang et al., Decoupling Representation and Classifier, ICLR 2020"

    def stage2(self, model, ctx: RunContext) -> TrainSpec:
        reinit_linear(model)
        return stage2_spec(ctx, list(model.fc.parameters()), sampler="class_aware")


METHOD = ClassifierRetraining()
