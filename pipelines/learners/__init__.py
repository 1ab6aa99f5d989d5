"""Learners that train the draft from verification feedback, one module per update rule.

    osd         forward KL at the rejected positions only            (pipelines/learners/osd.py)
    online      online gradient descent on every emitted position    (pipelines/learners/online.py)
    optimistic  optimistic OGD, or SGD momentum persisted across rounds (pipelines/learners/optimistic.py)
    ensemble    Hedge over a learning-rate grid, weighted merge       (pipelines/learners/ensemble.py)

The loss (forward KL to the target's stored top-m) is in pipelines/learners/distill.py; the shared training loop,
precision, guards and cross-round state rules are in pipelines/learners/base.py.
"""

from pipelines.learners.base import FitReport, Learner, LearnerSettings, NonFiniteError
from pipelines.learners.ensemble import EnsembleLearner
from pipelines.learners.online import OnlineLearner
from pipelines.learners.optimistic import OptimisticLearner
from pipelines.learners.osd import OSDLearner
from pipelines.settings import LEARNER_NAMES

LEARNERS: dict[str, type[Learner]] = {
    "osd": OSDLearner,
    "online": OnlineLearner,
    "optimistic": OptimisticLearner,
    "ensemble": EnsembleLearner,
}
assert tuple(LEARNERS) == LEARNER_NAMES, "pipelines.settings.LEARNER_NAMES lists the learners in this order"


def make_learner(settings: LearnerSettings) -> Learner:
    if settings.name not in LEARNERS:
        raise ValueError(f"Unknown learner {settings.name!r}; use one of {', '.join(LEARNER_NAMES)}")
    return LEARNERS[settings.name](settings)


__all__ = [
    "LEARNER_NAMES",
    "EnsembleLearner",
    "FitReport",
    "Learner",
    "LearnerSettings",
    "NonFiniteError",
    "OSDLearner",
    "OnlineLearner",
    "OptimisticLearner",
    "make_learner",
]
