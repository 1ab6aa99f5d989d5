"""EAGLE-style draft heads over the target's features:

    model.py      the head (DraftHead) and the head bound to its target (HeadDraft, what is served, trained, stored)
    drafting.py   one drafting round (draft_chain), shared by the engine's proposer and the replay
    losses.py     the training loss on teacher-forced sequences (KL to the target + feature regression, unrolled)
    train.py      bootstrap training from a corpus and the target's own answers (`onlinespec draft init`)
    feedback.py   a head's predictions on recorded feedback, and the target's features they need (learners)
    replay.py     exact greedy-chain replay of a head: the engine's rounds, simulated

The engine drafts with a head through pipelines.proposers.head; pipelines.drafts tells heads and draft LMs apart
for the learning rounds and checkpoints."""
