"""The head's training loss: unrolled steps see what live drafting sees, the chunked loss equals the plain one and
its gradient too, and a few steps of it teach a head the target's next features."""

from __future__ import annotations

import pytest
import torch

from pipelines.heads.drafting import draft_chain
from pipelines.heads.losses import HeadLossSettings, head_loss, unrolled_outputs
from pipelines.heads.model import target_features
from tests.head_fixtures import half_of_the_tokens, right_padded, scrambled_head, with_draft_vocab

pytestmark = pytest.mark.usefixtures("one_thread")


def prefixes(tokenizer) -> list[list[int]]:
    texts = ["def add(a, b):\n    return", "The quick brown fox jumps", "SELECT name FROM users WHERE", "To be"]
    return [tokenizer(t).input_ids for t in texts]


def test_unroll_two_predicts_at_step_two_what_draft_chain_proposes(head_target):
    """Step 2 of the unrolled loss is step 2 of live drafting: true step-1 keys up to p, its own key, and the
    head's own output in place of the feature, whenever step 1's proposal is the next token."""
    target, tokenizer = head_target
    draft = scrambled_head(target, seed=1)
    sequences = prefixes(tokenizer)
    tokens, lengths = right_padded(sequences)
    with torch.no_grad():
        features = target_features(target, tokens)
        current = torch.tensor(lengths) - 1  # L: the position of each row's last token
        window = max(lengths) + 1  # the catch-up rewrites every position: no prefill needed
        cache = draft.head.allocate_cache(len(sequences), window + 8)
        padded = torch.nn.functional.pad(tokens, (0, 1))  # draft_chain reads tokens up to position L
        proposed, _ = draft_chain(draft, cache, features, padded, current, 2, window, greedy_only=True)

        # the sequences the unrolled loss sees: each prefix followed by the head's own step-1 proposal
        extended, _ = right_padded([s + [int(d)] for s, d in zip(sequences, proposed[:, 0])])
        step1, step2 = unrolled_outputs(draft, extended, target_features(target, extended), steps=2)
    rows = torch.arange(len(sequences))
    chain = current - 1  # the chain started at L - 1 proposes t_{L+1}, then t_{L+2}
    assert torch.equal(draft.logits(step1[rows, chain]).argmax(-1), proposed[:, 0])
    assert torch.equal(draft.logits(step2[rows, chain]).argmax(-1), proposed[:, 1])


def test_the_losss_target_pass_gives_the_targets_features(head_target):
    target, tokenizer = head_target
    tokens, _ = right_padded(prefixes(tokenizer))
    with torch.no_grad():
        stock = target.get_decoder()(input_ids=tokens, use_cache=False).last_hidden_state  # transformers' own mask
        torch.testing.assert_close(target_features(target, tokens), stock)


def test_step_one_of_the_unrolled_forward_is_the_plain_teacher_forced_forward(head_target):
    target, tokenizer = head_target
    draft = scrambled_head(target, seed=2)
    tokens, lengths = right_padded(prefixes(tokenizer))
    with torch.no_grad():
        features = target_features(target, tokens)
        (plain,) = unrolled_outputs(draft, tokens, features, steps=1)
        unrolled = unrolled_outputs(draft, tokens, features, steps=3)
    for row, n in enumerate(lengths):
        torch.testing.assert_close(unrolled[0][row, : n - 1], plain[row, : n - 1])


def reference_loss(draft, tokens, lengths, settings: HeadLossSettings, vocab=None) -> torch.Tensor:
    """The loss written the obvious way: full [B, T, V] logits, a python loop over steps and rows; with `vocab`,
    both distributions renormalised over those token ids (the whole vocabulary's logits, then the columns kept)."""
    return reference_terms(draft, tokens, lengths, settings, vocab)[0]


def reference_terms(draft, tokens, lengths, settings: HeadLossSettings, vocab=None):
    """(loss, [unroll] summed KL, [unroll] positions where the head's argmax is the target's) of reference_loss."""
    columns = slice(None) if vocab is None else torch.tensor(sorted(vocab))
    features = target_features(draft.target, tokens).detach()
    outputs = unrolled_outputs(draft, tokens, features, settings.unroll)
    total = torch.zeros(())
    kl_sums, top1 = torch.zeros(settings.unroll), torch.zeros(settings.unroll)
    for s, weight in enumerate(settings.step_weights(), start=1):
        terms = []
        for row, n in enumerate(lengths):
            if n - s <= 0:
                continue
            g = outputs[s - 1][row, : n - s]  # chains p = 0 .. n-1-s
            f = features[row, s:n]  # their targets q = p + s
            log_p = torch.log_softmax(draft.logits(f)[:, columns], -1)
            log_q = torch.log_softmax(draft.logits(g)[:, columns], -1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            reg = torch.nn.functional.smooth_l1_loss(g, f, reduction="none").mean(-1)
            terms.append(kl + settings.regression_weight * reg)
            kl_sums[s - 1] += kl.sum().detach()
            top1[s - 1] += (log_q.argmax(-1) == log_p.argmax(-1)).sum()
        total = total + weight * torch.cat(terms).mean()
    return total, kl_sums, top1


@pytest.mark.parametrize("unroll", [1, 3])
def test_chunked_loss_and_gradient_equal_the_plain_computation(head_target, unroll):
    target, tokenizer = head_target
    tokens, lengths = right_padded(prefixes(tokenizer))
    settings = HeadLossSettings(regression_weight=0.5, unroll=unroll, chunk_positions=7)

    draft = scrambled_head(target, seed=3)
    draft.requires_grad_(True)
    expected = reference_loss(draft, tokens, lengths, settings)
    expected.backward()
    expected_grads = [p.grad.clone() for p in draft.parameters()]
    draft.zero_grad(set_to_none=True)

    loss = head_loss(draft, tokens, lengths, settings, backward=True)
    torch.testing.assert_close(loss.objective, expected.detach())
    for p, g in zip(draft.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))
    assert loss.positions == [sum(max(n - s, 0) for n in lengths) for s in range(1, unroll + 1)]
    assert not any(p.grad is None for p in target.parameters() if p.requires_grad)  # the target stays frozen
    assert all(not p.requires_grad for p in target.parameters())


@pytest.mark.parametrize("draft_vocab_only", [False, True])
def test_a_head_with_a_draft_vocabulary_trains_over_it_only_when_asked(head_target, draft_vocab_only):
    """draft_vocab_only: p and q renormalised over the draft vocabulary, loss and gradient; without it, the whole
    vocabulary as before, whatever the head proposes."""
    target, tokenizer = head_target
    sequences = prefixes(tokenizer)
    tokens, lengths = right_padded(sequences)
    vocab = half_of_the_tokens(sequences)
    settings = HeadLossSettings(unroll=2, chunk_positions=5, draft_vocab_only=draft_vocab_only)

    draft = with_draft_vocab(scrambled_head(target, seed=4), vocab)
    draft.requires_grad_(True)
    expected, kl, top1 = reference_terms(draft, tokens, lengths, settings, vocab if draft_vocab_only else None)
    expected.backward()
    expected_grads = [p.grad.clone() for p in draft.parameters()]
    draft.zero_grad(set_to_none=True)

    loss = head_loss(draft, tokens, lengths, settings, backward=True)
    torch.testing.assert_close(loss.objective, expected.detach())
    torch.testing.assert_close(loss.kl, kl)
    assert torch.equal(loss.top1, top1)  # argmaxes compared in one index space
    for p, g in zip(draft.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))


def test_a_few_steps_of_the_loss_teach_a_fresh_head(head_target):
    target, tokenizer = head_target
    from pipelines.heads.model import DraftHead, HeadDraft

    draft = HeadDraft(DraftHead.for_target(target), target)
    draft.requires_grad_(True)
    tokens, lengths = right_padded(prefixes(tokenizer))
    settings = HeadLossSettings(unroll=2)
    optimizer = torch.optim.AdamW(draft.parameters(), lr=1e-2)
    first = head_loss(draft, tokens, lengths, settings)
    for _ in range(30):
        optimizer.zero_grad()
        head_loss(draft, tokens, lengths, settings, backward=True)
        optimizer.step()
    last = head_loss(draft, tokens, lengths, settings)
    assert float(last.objective) < 0.35 * float(first.objective)
    assert (last.top1 > first.top1 + 0.2 * torch.tensor(last.positions)).all()  # both steps now often right


def fused_head_with_vocab(target, sequences, seed: int):
    from pipelines.heads.model import DraftHead, HeadDraft

    vocab = half_of_the_tokens(sequences)
    head = DraftHead.for_target(target, 1, "random", seed, draft_vocab=vocab, feature_layers=(1, 2))
    return HeadDraft(head, target)


@pytest.mark.parametrize("kind", ["plain", "fused, draft vocabulary"])
def test_kept_target_features_train_the_same_head_without_the_targets_pass_after_the_first_epoch(head_target, kind):
    """The bootstrap's feature cache: the same weights as recomputing every epoch, the target run only on batches
    not kept, never more kept than its limit, and nothing kept when no batch comes round twice."""
    from devtools.tiny_models import TRAINING_TEXT
    from pipelines.heads.train import BootstrapSettings, train_head

    target, tokenizer = head_target
    sequences = [tokenizer(line).input_ids for line in TRAINING_TEXT.splitlines() if line][:12]
    loss = HeadLossSettings(unroll=2, draft_vocab_only=kind != "plain")

    def trained(cache_gib: float | None, epochs: float = 3):
        draft = scrambled_head(target, seed=5) if kind == "plain" else fused_head_with_vocab(target, sequences, 5)
        passes = []
        compute = draft.target_features
        draft.target_features = lambda ids: passes.append(ids.shape[0]) or compute(ids)
        settings = BootstrapSettings(
            epochs=epochs, max_length=16, batch_tokens=64, lr=1e-3, feature_cache_gib=cache_gib, loss=loss
        )
        report = train_head(draft, sequences, settings)
        return draft.head.state_dict(), len(passes), report

    recomputed, passes, report = trained(0.0)
    assert report.cached_batches == 0 and passes == report.steps == 3 * report.batches and report.batches >= 3
    kept, passes, report = trained(None)  # the automatic limit: all of it fits in this machine's RAM
    assert report.cached_batches == report.batches and passes == report.batches  # the first epoch only
    assert report.feature_cache_limit_bytes == report.feature_cache_bytes  # capped at what the features take
    half = report.feature_cache_bytes / 2
    partly, passes, report = trained(half / 2**30)
    assert 0 < report.cached_batches < report.batches and report.feature_cache_bytes <= half
    assert passes == report.batches + 2 * (report.batches - report.cached_batches)
    for weights in (kept, partly):
        assert weights.keys() == recomputed.keys()
        for name in recomputed:
            torch.testing.assert_close(weights[name], recomputed[name], rtol=0, atol=0)
    _, _, report = trained(1.0, epochs=1)  # one pass: nothing to reuse, nothing kept
    assert report.feature_cache_limit_bytes == 0 and report.cached_batches == 0
