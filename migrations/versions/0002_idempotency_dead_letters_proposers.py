"""Idempotency hashes, the dead-letter table, proposer stamps, draft kinds and stored settings.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

- requests.request_hash: sha256 of the request as parsed (daemon.serving.messages.request_hash); the same id with
  another hash is a conflict, the same id with the same hash a client retry. NULL on rows written before.
- requests.status loses 'failed' (never written: a request that cannot be decoded is dead-lettered).
- requests (kafka_topic, kafka_partition, kafka_offset) is no longer unique: the id (with its hash) identifies a
  request, and a re-created topic hands out offsets that earlier requests were received at. (A downgrade
  re-creates the constraint and fails if such positions were recorded since.)
- dead_letters: one row per dead-lettered record (also those without a usable id), its reason, coordinates and the
  original value's size and sha256; the value itself only when limits.keep_dead_letter_values is on. Its
  positions are indexed, not unique, for the same reason.
- feedback.draft_sources: [n] uint8, who drafted each emitted position (pipelines.types.SOURCE_*); NULL on rows
  written before (their draft tokens all came from the draft model).
- completions.by_proposer: raw counters per proposer ({"draft": {"rounds", "drafted", "accepted"}, ...}).
- draft_checkpoints.kind ('draft' LM or 'head'), draft_checkpoints.settings (the full resolved config, secrets
  masked); window_first_at / window_last_at dropped (never written).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UTC_DATETIME = sa.DateTime(timezone=True)
BIGINT_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))
        batch.drop_constraint(op.f("uq_requests_kafka_topic_kafka_partition_kafka_offset"), type_="unique")
        batch.drop_constraint(op.f("ck_requests_status"), type_="check")
        batch.create_check_constraint(
            op.f("ck_requests_status"), "status IN ('received', 'completed', 'dead_lettered')"
        )

    op.create_table(
        "dead_letters",
        sa.Column("id", BIGINT_KEY, autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=512), nullable=True),
        sa.Column("kafka_topic", sa.String(length=255), nullable=False),
        sa.Column("kafka_partition", sa.Integer(), nullable=False),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=False),
        sa.Column("reason_code", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("value_size", sa.BigInteger(), nullable=True),
        sa.Column("value_sha256", sa.String(length=64), nullable=True),
        sa.Column("value", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
    )
    op.create_index(
        op.f("ix_dead_letters_kafka_topic"), "dead_letters", ["kafka_topic", "kafka_partition", "kafka_offset"]
    )
    op.create_index(op.f("ix_dead_letters_request_id"), "dead_letters", ["request_id"])
    op.create_index(op.f("ix_dead_letters_created_at"), "dead_letters", ["created_at"])

    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("draft_sources", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("completions") as batch:
        batch.add_column(sa.Column("by_proposer", sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table("draft_checkpoints") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="draft"))
        batch.add_column(sa.Column("settings", sa.JSON(none_as_null=True), nullable=True))
        batch.drop_column("window_first_at")
        batch.drop_column("window_last_at")
        batch.create_check_constraint(op.f("ck_draft_checkpoints_kind"), "kind IN ('draft', 'head')")


def downgrade() -> None:
    with op.batch_alter_table("draft_checkpoints") as batch:
        batch.drop_constraint(op.f("ck_draft_checkpoints_kind"), type_="check")
        batch.add_column(sa.Column("window_last_at", UTC_DATETIME, nullable=True))
        batch.add_column(sa.Column("window_first_at", UTC_DATETIME, nullable=True))
        batch.drop_column("settings")
        batch.drop_column("kind")
    with op.batch_alter_table("completions") as batch:
        batch.drop_column("by_proposer")
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("draft_sources")
    op.drop_index(op.f("ix_dead_letters_created_at"), table_name="dead_letters")
    op.drop_index(op.f("ix_dead_letters_request_id"), table_name="dead_letters")
    op.drop_index(op.f("ix_dead_letters_kafka_topic"), table_name="dead_letters")
    op.drop_table("dead_letters")
    with op.batch_alter_table("requests") as batch:
        batch.drop_constraint(op.f("ck_requests_status"), type_="check")
        batch.create_check_constraint(
            op.f("ck_requests_status"), "status IN ('received', 'completed', 'failed', 'dead_lettered')"
        )
        batch.create_unique_constraint(
            op.f("uq_requests_kafka_topic_kafka_partition_kafka_offset"),
            ["kafka_topic", "kafka_partition", "kafka_offset"],
        )
        batch.drop_column("request_hash")
