"""The online learner on a bootstrapped head, with and without the bootstrap's two-step loss beside its step-1 KL
(LearnerSettings.head_chain_weight), on the tiny models of the tests (CPU, ~20 s; it reuses the tests' helpers):

    python -m bench.head_chain_tiny [--out FILE.json]

A head is trained on the target's answers to one stream (tests.head_fixtures.fitted_head), then the online
learner runs 5 rounds of 16 fresh requests of the same stream at two learning rates, with head_chain_weight 0 and
1; after every round the head's exact held-out AvgLen (k = 5) and its step-1 acceptance estimate are printed.
Why: on an H100 the step-1 KL alone raised a strong head's step-1 acceptance while its chain AvgLen fell
(BENCHMARKS.md section 8). Tiny random models show mechanisms, not the real pair's figures.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch

from devtools.tiny_models import make_tiny_pair
from pipelines.engine import EngineSettings, SpeculativeEngine
from pipelines.learners import LearnerSettings, make_learner
from pipelines.models import load_model, load_tokenizer
from pipelines.replay import replay
from tests.head_fixtures import fitted_head
from tests.rounds_fixtures import stream


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        target_dir, _ = make_tiny_pair(Path(folder))
        target, tokenizer = load_model(str(target_dir)), load_tokenizer(str(target_dir))
    settings = EngineSettings(proposer="none", max_batch_size=8, max_seq_len=256, top_m=8)
    engine = SpeculativeEngine(target, None, tokenizer, settings)
    decode = lambda count, seed: [r.feedback for r in engine.generate(stream(tokenizer, count, seed=seed))]  # noqa: E731
    bootstrap, heldout, rounds = decode(24, 50), decode(16, 100), [decode(16, seed) for seed in range(5)]
    head = fitted_head(target, bootstrap, steps=60)
    static = replay(head, heldout, k=5)
    results = {"static": {"avg_len": static.avg_len, "acceptance": static.acceptance}, "runs": []}
    print(f"static head: held-out AvgLen {static.avg_len:.3f}, step-1 acceptance {static.acceptance:.3f}")
    for lr in (3e-3, 1e-2):
        for weight in (0.0, 1.0):
            draft = copy.deepcopy(head)
            learner = make_learner(
                LearnerSettings(name="online", lr=lr, trainable="all", epochs=2, batch_size=4, head_chain_weight=weight)
            )
            per_round = []
            for number, feedback in enumerate(rounds):
                learner.fit(draft, feedback, base_version=f"v{number}")
                learner.note_candidate_version(f"v{number + 1}")
                metrics = replay(draft, heldout, k=5)
                per_round.append({"avg_len": metrics.avg_len, "acceptance": metrics.acceptance})
            mean = sum(r["avg_len"] for r in per_round) / len(per_round)
            results["runs"].append({"lr": lr, "head_chain_weight": weight, "rounds": per_round, "avg_len_mean": mean})
            shown = "  ".join(f"{r['avg_len']:.2f}/{r['acceptance']:.2f}" for r in per_round)
            print(
                f"lr {lr:g} head_chain_weight {weight:g}: AvgLen/acceptance by round {shown}  "
                f"mean AvgLen {mean:.3f} ({mean / static.avg_len - 1:+.1%} vs static)"
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
