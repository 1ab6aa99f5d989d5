"""What a draft swap costs, and where: the follower's background work against the decode thread's copy.

    python -m bench.draft_swap --draft assets/qwen-coder/draft.gguf [--dtype float32] [--repeats 3]

Stores the draft's weights as a checkpoint (safetensors, sha256-addressed, as learning rounds do), then per repeat:
    background   CheckpointStore.get (read + sha256 verify) and cast_like (to the served draft's device and dtype),
                 what DraftFollower's thread does
    decode       DraftModelProposer.swap: the in-place copy into the served parameters, all the decode thread does
Prints JSON with the median of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from daemon.learning.draft_follower import cast_like
from pipelines.models import load_model
from pipelines.proposers.draft import DraftModelProposer
from storage.artifacts import CheckpointStore


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", required=True, help="draft model: HF folder or .gguf file")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model = load_model(args.draft, args.dtype, args.device)
    load_s = time.perf_counter() - started
    proposer = DraftModelProposer(model, max_batch_size=1, max_seq_len=64)
    prepare = cast_like(model)
    candidate = {name: tensor.detach().to("cpu", copy=True) + 1e-3 for name, tensor in model.state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="draft-swap-") as folder:
        store = CheckpointStore(Path(folder))
        stored = store.put(candidate)
        background, decode = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            ready = prepare(store.get(stored.sha256, expected_size=stored.size_bytes))
            background.append(time.perf_counter() - started)
            started = time.perf_counter()
            proposer.swap(ready)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            decode.append(time.perf_counter() - started)
    report = {
        "draft": args.draft,
        "dtype": str(next(model.parameters()).dtype),
        "device": args.device,
        "parameters": sum(p.numel() for p in model.parameters()),
        "file_bytes": stored.size_bytes,
        "load_model_s": load_s,
        "background_s": statistics.median(background),
        "decode_thread_s": statistics.median(decode),
        "repeats": args.repeats,
        "threads": args.threads,
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
