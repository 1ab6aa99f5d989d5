"""`onlinespec draft init --kind head` on the tiny target: a corpus of every record kind plus the target's own
answers, a held-out AvgLen that rises, a head folder that loads back with its recipe, --max-seconds honoured, and
operator errors as one line."""

from __future__ import annotations

import json
import random

import pytest
import torch

from daemon.cli import main as cli
from devtools.tiny_models import TRAINING_TEXT
from pipelines.heads.model import DraftHead, read_head_config
from tests.rounds_fixtures import TEMPLATE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bootstrap")
    corpus = [{"text": line} for line in TRAINING_TEXT.splitlines() if line][:6]
    corpus += [
        {"prompt": "def add(a, b):"},
        {"messages": [{"role": "user", "content": "The quick brown fox"}, {"role": "assistant", "content": "jumps"}]},
        {"text": ""},  # unusable: reported, the others go on
        "not an object",
    ]
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in corpus) + "\n\n")
    rng = random.Random(0)
    prompts = [{"id": f"p{i}", "prompt": TEMPLATE.format(n=rng.randrange(10))} for i in range(40)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return root


def draft_init(head_target_dir, files, out, *extra) -> int:
    flags = "--generate 24 --heldout 12 --max-new-tokens 32 --k 3 --init random --max-length 64 --batch-tokens 512"
    data = ["--corpus", str(files / "corpus.jsonl"), "--prompts", str(files / "prompts.jsonl")]
    command = ["draft", "init", "--kind", "head", "--target", str(head_target_dir), *data, *flags.split()]
    return cli([*command, "--lr", "3e-3", "--out", str(out), *extra])


def test_bootstrap_trains_a_head_that_beats_the_fresh_one_and_records_its_recipe(tiny_models, files, tmp_path, capsys):
    out = tmp_path / "head"
    assert draft_init(tiny_models[0], files, out, "--epochs", "40") == 0
    log = capsys.readouterr().err
    assert "skipped 2 unusable lines" in log and "trained" in log and "held-out AvgLen" in log

    config, metadata = read_head_config(out)
    assert config.num_layers == 1 and config.init == "random"
    heldout, recipe, training = metadata["heldout"], metadata["recipe"], metadata["training"]
    before, after = heldout["avg_len_before"], heldout["avg_len_after"]
    print(f"held-out AvgLen {before:.3f} -> {after:.3f}, {training['seconds']:.1f} s")
    assert heldout["avg_len_after"] >= 1.3 * heldout["avg_len_before"]
    assert heldout["requests"] == 12 and heldout["k"] == 3 and heldout["window"] == 4
    assert recipe["corpus_sequences"] == 8 and recipe["generated"] == 24 and recipe["skipped_lines"] == 2
    assert recipe["training_sequences"] == 32 and len(recipe["target"]["identity"]) == 16
    assert training["stopped_by"] == "budget" and training["steps"] > 0
    assert training["tokens"] >= training["budget"] and training["settings"]["loss"]["unroll"] == 2

    from pipelines.models import load_model

    head = DraftHead.load(out, load_model(str(tiny_models[0])))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in head.parameters())


def test_a_draft_vocabulary_of_the_most_frequent_tokens_is_built_and_stored(tiny_models, files, tmp_path, capsys):
    out = tmp_path / "head"
    assert draft_init(tiny_models[0], files, out, "--epochs", "4", "--draft-vocab", "40") == 0
    log = capsys.readouterr().err
    assert "draft vocabulary: the 40 most frequent tokens" in log and "...whole vocabulary: held-out AvgLen" in log
    config, metadata = read_head_config(out)
    assert config.draft_vocab_size == 40 and metadata["recipe"]["head"]["draft_vocab"] == 40
    assert metadata["heldout"]["avg_len_whole_vocab"] >= 1.0  # the same weights proposing any token, same rows

    from pipelines.models import load_head, load_model

    target = load_model(str(tiny_models[0]))
    head = load_head(str(out), target)
    vocab = head.head.draft_vocab.tolist()
    assert len(vocab) == 40 and vocab == sorted(set(vocab))
    whole = head.with_whole_vocab()
    assert whole.head.draft_vocab is None and whole.config.draft_vocab_size == 0
    weights = head.head.state_dict()
    assert all(torch.equal(t, weights[name]) for name, t in whole.head.state_dict().items())
    assert draft_init(tiny_models[0], files, tmp_path / "big", "--draft-vocab", str(10**9)) == 2
    assert "must be 1.." in capsys.readouterr().err


def test_a_fused_head_is_bootstrapped_over_the_chosen_layers_and_stored_with_them(tiny_models, files, tmp_path, capsys):
    out = tmp_path / "head"
    assert draft_init(tiny_models[0], files, out, "--epochs", "40", "--feature-layers", "1", "3") == 0
    config, metadata = read_head_config(out)
    assert config.feature_layers == (1, 3) and metadata["recipe"]["head"]["feature_layers"] == [1, 3]
    heldout = metadata["heldout"]
    assert heldout["avg_len_after"] >= 1.3 * heldout["avg_len_before"]

    from pipelines.models import load_head, load_model

    head = load_head(str(out), load_model(str(tiny_models[0])))
    assert head.config.feature_layers == (1, 3) and head.head.fuse.weight[:, 64:].abs().sum() > 0  # lower layers read
    capsys.readouterr()
    assert draft_init(tiny_models[0], files, tmp_path / "deep", "--feature-layers", "4") == 2
    assert "feature_layers [4]: distinct increasing layer counts in 1..3" in capsys.readouterr().err


def test_max_seconds_stops_training_and_the_head_is_still_saved_and_evaluated(tiny_models, files, tmp_path):
    out = tmp_path / "head"
    assert draft_init(tiny_models[0], files, out, "--tokens", "100000000", "--max-seconds", "1") == 0
    _, metadata = read_head_config(out)
    assert metadata["training"]["stopped_by"] == "max_seconds"
    assert metadata["training"]["seconds"] < 5 and metadata["heldout"]["avg_len_after"] > 0


def test_operator_errors_are_one_line(tiny_models, files, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    cases = [
        (["--out", str(taken)], "is not an empty folder"),
        (["--tokens", "10", "--epochs", "1"], "not allowed with argument"),
        (["--feature-cache-gib", "nan"], "feature_cache_gib must be a finite number >= 0"),
        (["--feature-cache-gib", "-1"], "feature_cache_gib must be a finite number >= 0"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) if "argument" in message else _nothing():
            assert draft_init(tiny_models[0], files, tmp_path / "fresh", *extra) == 2
        assert message in capsys.readouterr().err
    code = cli(["draft", "init", "--kind", "head", "--target", str(tiny_models[0]), "--out", str(tmp_path / "o")])
    assert code == 2 and "give --corpus FILE" in capsys.readouterr().err
    missing = ["--corpus", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]
    assert cli(["draft", "init", "--kind", "head", "--target", str(tiny_models[0]), *missing]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
