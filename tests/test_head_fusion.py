"""Fused heads (EAGLE-3): the target's features are its last hidden state and the residual streams after chosen
layers, computed alike by teacher forcing and by the engine's cached forward; a fresh fused head is exactly the
unfused one, training moves it off the last layer alone; the layers are checked, stored and compared on swaps.
(Greedy equality with HF, the sampling test and replay against live accounting run fused heads in
test_engine_greedy, test_engine_sampling and test_head_replay.)"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from pipelines.heads.model import DraftHead, HeadConfig, HeadDraft, head_config_from_document, read_head_config
from pipelines.kv_cache import PositionalKVCache, decoder_forward
from tests.head_fixtures import fitted_head, right_padded, target_only
from tests.test_replay import MAX_NEW, PROMPTS

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = (1, 3)  # of the tiny target's 4


def token_rows(tokenizer) -> tuple[torch.Tensor, list[int]]:
    return right_padded([tokenizer(t).input_ids for t in ["def add(a, b):\n    return", "The quick brown fox", "To"]])


def test_fused_features_are_the_last_hidden_state_then_the_stream_after_each_chosen_layer(head_target):
    """Checked against forward hooks on the target's own decoder layers: 'layer n' is the output of the first n."""
    target, tokenizer = head_target
    tokens, _ = token_rows(tokenizer)
    decoder = target.get_decoder()
    outputs = {}
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out, n=n: outputs.__setitem__(n, out))
        for n, layer in enumerate(decoder.layers, start=1)
    ]
    try:
        with torch.no_grad():
            last = decoder(input_ids=tokens, use_cache=False).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    draft = HeadDraft(DraftHead.for_target(target, feature_layers=LAYERS), target)
    with torch.no_grad():
        features = draft.target_features(tokens)
    hidden = target.config.hidden_size
    assert features.shape == (*tokens.shape, 3 * hidden)
    torch.testing.assert_close(features[..., :hidden], last)
    for part, n in enumerate(LAYERS, start=1):
        torch.testing.assert_close(features[..., part * hidden : (part + 1) * hidden], outputs[n])
    assert not torch.allclose(outputs[1], outputs[3])  # the layers differ: the check above can tell them apart

    # the engine's forward (positional cache, explicit mask, as the verify pass and prefill run it) gives the same
    cache = PositionalKVCache.allocate(target, tokens.shape[0], tokens.shape[1] + 4)
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    with torch.no_grad():
        engine_features = decoder_forward(target, feature_layers=LAYERS)(tokens, positions, cache)
    torch.testing.assert_close(engine_features, features)


def test_a_fresh_fused_head_drafts_exactly_as_the_unfused_head(head_target):
    target, tokenizer = head_target
    tokens, _ = token_rows(tokenizer)
    plain = HeadDraft(DraftHead.for_target(target, init="random", seed=3), target)
    fused = HeadDraft(DraftHead.for_target(target, init="random", seed=3, feature_layers=LAYERS), target)
    positions = torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1)
    with torch.no_grad():
        wide = fused.target_features(tokens)
        expected = plain(tokens[:, 1:], plain.target_features(tokens)[:, :-1], positions)
        torch.testing.assert_close(fused(tokens[:, 1:], wide[:, :-1], positions), expected, rtol=0, atol=0)
        # its own outputs (H wide, steps >= 2 of a chain) go straight into its layers, as the unfused head's do
        torch.testing.assert_close(fused(tokens[:, 1:], expected, positions), plain(tokens[:, 1:], expected, positions))
        with pytest.raises(ValueError, match="a head reads features 64 or 64 wide, got 192"):  # F to an unfused head
            plain(tokens[:, 1:], wide[:, :-1], positions)


def test_training_moves_the_fusion_off_the_last_layer_alone(head_target):
    """After a few steps the lower layers are read: their columns of the fusion are no longer zero, and changing
    them changes what the head predicts."""
    target, tokenizer = head_target
    feedback = target_only(target, tokenizer, PROMPTS, MAX_NEW)
    draft = fitted_head(target, feedback, feature_layers=LAYERS)
    hidden = target.config.hidden_size
    assert draft.head.fuse.weight[:, hidden:].abs().sum() > 0
    tokens, _ = token_rows(tokenizer)
    positions = torch.arange(tokens.shape[1] - 1).expand(tokens.shape[0], -1)
    with torch.no_grad():
        features = draft.target_features(tokens)[:, :-1]
        shifted = features.clone()
        shifted[..., hidden:] = features[..., hidden:].roll(1, dims=1)  # other positions' lower-layer streams
        assert not torch.allclose(draft(tokens[:, 1:], features, positions), draft(tokens[:, 1:], shifted, positions))


@pytest.mark.parametrize("layers", [(0,), (4,), (3, 1), (2, 2)])
def test_layers_outside_the_target_or_out_of_order_are_refused(head_target, layers):
    with pytest.raises(ValueError, match="distinct increasing layer counts in 1..3"):
        DraftHead.for_target(head_target[0], feature_layers=layers)


def test_the_layers_are_stored_with_the_head_and_older_heads_read_as_unfused(head_target, tmp_path):
    target, _ = head_target
    draft = HeadDraft(DraftHead.for_target(target, init="random", seed=4, feature_layers=LAYERS), target)
    draft.head.save(tmp_path / "fused")
    config, _ = read_head_config(tmp_path / "fused")
    assert config.feature_layers == LAYERS and config.feature_size == 3 * target.config.hidden_size
    loaded, saved = DraftHead.load(tmp_path / "fused", target).state_dict(), draft.head.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[n], saved[n]) for n in saved)
    assert loaded["feature_layers"].tolist() == list(LAYERS)
    assert head_config_from_document(json.loads(json.dumps(asdict(config)))) == config  # as checkpoints store it
    older = {k: v for k, v in asdict(config).items() if k != "feature_layers"}  # written before fusion existed
    assert head_config_from_document(older).feature_layers == ()
    assert HeadConfig(1, target.config.to_dict()).feature_size == target.config.hidden_size
    state = {**draft.head.state_dict(), "feature_layers": torch.tensor([1, 2])}  # weights and config disagree
    with pytest.raises(ValueError, match=r"read target layers \[1, 2\], its config says \[1, 3\]"):
        DraftHead.from_state(target, config, state)


def test_a_serving_engine_refuses_a_head_fused_over_other_layers(head_target):
    """Same shapes, other layers: the engine's verify pass returns the layers it was built for, so such weights
    would read the wrong streams. The refusal leaves the served head as it was; same layers swap."""
    from pipelines.engine import EngineSettings, SpeculativeEngine

    target, tokenizer = head_target
    served = HeadDraft(DraftHead.for_target(target, init="random", seed=5, feature_layers=LAYERS), target)
    engine = SpeculativeEngine(target, served, tokenizer, EngineSettings(proposer="head", k=2, max_seq_len=64))
    before = {n: t.clone() for n, t in served.state_dict().items()}
    other = HeadDraft(DraftHead.for_target(target, init="random", seed=6, feature_layers=(1, 2)), target)
    for weights in (other, other.state_dict()):
        with pytest.raises(ValueError, match=r"fused over target layers \[1, 2\] do not fit"):
            engine.swap_draft(weights, "v-other")
    assert all(torch.equal(t, before[n]) for n, t in served.state_dict().items())
    same = HeadDraft(DraftHead.for_target(target, init="random", seed=7, feature_layers=LAYERS), target)
    engine.swap_draft(same, "v-same")
    assert torch.equal(served.head.fuse.weight, same.head.fuse.weight) and engine.draft_version == "v-same"


def test_a_new_head_for_the_daemon_is_fused_over_the_configured_layers(tiny_models):
    from pipelines.models import NEW_HEAD, IncompatibleModelsError, load_pair

    _, draft, _ = load_pair(str(tiny_models[0]), NEW_HEAD, "float32", head_feature_layers=LAYERS)
    assert draft.config.feature_layers == LAYERS
    with pytest.raises(IncompatibleModelsError, match=r"a new head for .*: feature_layers \[9\]"):
        load_pair(str(tiny_models[0]), NEW_HEAD, "float32", head_feature_layers=(9,))


def test_a_fused_head_does_not_fit_a_target_of_another_depth(head_target):
    from pipelines.heads.model import check_head_fits_config

    target, _ = head_target
    fused = DraftHead.for_target(target, feature_layers=LAYERS).config
    shallower = {**target.config.to_dict(), "num_hidden_layers": 2}
    with pytest.raises(ValueError, match="num_hidden_layers is 4, the target's 2"):
        check_head_fits_config(fused, shallower)
    check_head_fits_config(DraftHead.for_target(target).config, shallower)  # an unfused head reads no layer by index


def test_compile_is_refused_with_a_fused_head(head_target):
    """transformers' hidden-state hooks break torch.compile's fullgraph mode; the engine says so before warm-up."""
    from pipelines.engine import EngineSettings, SpeculativeEngine

    target, tokenizer = head_target
    fused = HeadDraft(DraftHead.for_target(target, feature_layers=LAYERS), target)
    with pytest.raises(ValueError, match="engine.compile does not work with a head fused over lower target layers"):
        SpeculativeEngine(target, fused, tokenizer, EngineSettings(proposer="head", k=2, compile=True))
    SpeculativeEngine(
        target,
        HeadDraft(DraftHead.for_target(target), target),
        tokenizer,
        EngineSettings(proposer="head", k=2, compile=True),
    )
