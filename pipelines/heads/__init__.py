"""EAGLE-style draft heads over the target's features: the model (model.py), bootstrap training from a corpus
(train.py) and exact held-out replay of a head's greedy chains (replay.py). The engine drafts with a head through
pipelines.proposers.head."""
