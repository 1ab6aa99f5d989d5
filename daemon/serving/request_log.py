"""One INFO line per request the daemon answered, written by the sink stage once the broker has acknowledged the
answer: what an operator greps for a request id, with its acceptance (the same counters as its completion)."""

from __future__ import annotations

import logging

log = logging.getLogger("daemon.serving.requests")


def log_answered(decoded, resent) -> None:
    """`decoded`: ledger.Decoded of the batch; `resent`: (Inbound, stored message) pairs answered from storage."""
    if not log.isEnabledFor(logging.INFO):
        return
    for d in decoded:
        counters, timings = d.result.counters, d.timings
        log.info(
            "served %s (%s): %d tokens, %s, AvgLen %.2f, %d/%d draft tokens accepted, draft %s, queue %.3f s, "
            "decode %.3f s",
            d.result.id,
            d.item.where,
            counters.emitted,
            d.result.finish_reason,
            counters.mean_accepted_length,
            counters.accepted,
            counters.drafted,
            d.result.feedback.draft_version,
            timings.get("queue_s", 0.0),
            timings.get("decode_s", 0.0),
        )
    for item, _ in resent:
        log.info("re-sent %s (%s): its stored completion, not decoded again", item.message.id, item.where)
