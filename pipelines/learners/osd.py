"""OSD (Online Speculative Decoding, Liu et al., ICML 2024): distil only where the draft was rejected.

Update rule: the same optimizer steps as `online` (AdamW by default, `epochs` passes over the round; the round
is OSD's buffer of recent requests), but the loss of a step averages the forward KL over the rejected positions
only:

    L(theta) = (1 / |R|) sum_{i in R} KL(p_target,i || q_theta,i)
    R = positions of kind KIND_RECOVERED   (the serving draft proposed a token there and the target rejected it)

OSD recomputes the target's distribution with an extra forward; here the verification pass already stored it.
Fallback for feedback without draft proposals (target-only decoding, every kind is BONUS): R = the positions
where the draft being trained would be rejected now, i.e. its teacher-forced argmax differs from the emitted
token; re-evaluated at every step, so it shrinks as the draft learns. Bonus positions (after a fully accepted
step) and accepted positions are never trained on by the KL. loss_before / loss_after are measured on the same
positions. A step whose requests have no such position is skipped. A head also takes the chain term
(LearnerSettings.head_chain_weight, pipelines.learners.base) over every answer position of the step's requests:
it keeps the drafting steps that read the head's own output trained, which the rejected positions alone do not.
"""

from __future__ import annotations

from pipelines.learners.online import OnlineLearner


class OSDLearner(OnlineLearner):
    name = "osd"
    positions = "rejected"
