"""The online learner on a bootstrapped head, with and without the bootstrap's two-step loss beside its step-1 KL
(LearnerSettings.head_chain_weight), on the tiny models of the tests (CPU, ~10 s a seed; it reuses the tests' helpers):

    python -m bench.head_chain_tiny [--seeds 0 1 2] [--out FILE.json]

A head is trained on the target's answers to one stream (tests.head_fixtures.fitted_head), then the online
learner runs 5 rounds of 16 fresh requests of the same stream at two learning rates, with head_chain_weight 0 and
1; after every round the head's exact held-out AvgLen (k = 5) and its step-1 acceptance estimate are printed, and
last the mean AvgLen gain over static per seed (each seed: another head init, other requests, other shuffling).
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


def one_seed(seed: int, target, tokenizer, engine) -> dict:
    """The static head and the four learner runs for one seed (the head's init, the streams, the shuffling)."""
    decode = lambda count, stream_seed: [  # noqa: E731
        r.feedback for r in engine.generate(stream(tokenizer, count, seed=stream_seed + 1000 * seed))
    ]
    bootstrap, heldout, rounds = decode(24, 50), decode(16, 100), [decode(16, number) for number in range(5)]
    head = fitted_head(target, bootstrap, steps=60, seed=seed)
    static = replay(head, heldout, k=5)
    result = {"seed": seed, "static": {"avg_len": static.avg_len, "acceptance": static.acceptance}, "runs": []}
    print(f"seed {seed}: static head: held-out AvgLen {static.avg_len:.3f}, step-1 acceptance {static.acceptance:.3f}")
    for lr in LRS:
        for weight in WEIGHTS:
            draft = copy.deepcopy(head)
            settings = LearnerSettings(
                name="online", lr=lr, trainable="all", epochs=2, batch_size=4, head_chain_weight=weight, seed=seed
            )
            learner = make_learner(settings)
            per_round = []
            for number, feedback in enumerate(rounds):
                learner.fit(draft, feedback, base_version=f"v{number}")
                learner.note_candidate_version(f"v{number + 1}")
                metrics = replay(draft, heldout, k=5)
                per_round.append({"avg_len": metrics.avg_len, "acceptance": metrics.acceptance})
            mean = sum(r["avg_len"] for r in per_round) / len(per_round)
            gain = mean / static.avg_len - 1
            result["runs"].append(
                {"lr": lr, "head_chain_weight": weight, "rounds": per_round, "avg_len_mean": mean, "gain": gain}
            )
            shown = "  ".join(f"{r['avg_len']:.2f}/{r['acceptance']:.2f}" for r in per_round)
            print(
                f"  lr {lr:g} head_chain_weight {weight:g}: AvgLen/acceptance by round {shown}  "
                f"mean AvgLen {mean:.3f} ({gain:+.1%} vs static)"
            )
    return result


LRS = (3e-3, 1e-2)
WEIGHTS = (0.0, 1.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (default 0)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        target_dir, _ = make_tiny_pair(Path(folder))
        target, tokenizer = load_model(str(target_dir)), load_tokenizer(str(target_dir))
    settings = EngineSettings(proposer="none", max_batch_size=8, max_seq_len=256, top_m=8)
    engine = SpeculativeEngine(target, None, tokenizer, settings)
    seeds = [one_seed(seed, target, tokenizer, engine) for seed in args.seeds]
    summary = []
    for lr in LRS:
        for weight in WEIGHTS:
            gains = [r["gain"] for s in seeds for r in s["runs"] if (r["lr"], r["head_chain_weight"]) == (lr, weight)]
            mean = sum(gains) / len(gains)
            summary.append({"lr": lr, "head_chain_weight": weight, "gains": gains, "gain_mean": mean})
            print(
                f"lr {lr:g} head_chain_weight {weight:g}: mean AvgLen vs static per seed "
                + " ".join(f"{g:+.1%}" for g in gains)
                + f", mean {mean:+.1%}"
            )
    if args.out:
        args.out.write_text(json.dumps({"seeds": seeds, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
