"""Initial schema: requests, completions, feedback, draft checkpoints, active pointer, events, learning rounds.

Revision ID: 0001
Revises:
Create Date: 2026-11-28

Types are spelled out here rather than imported from storage.models: a revision must keep meaning what it
meant when it was written, whatever the models become later.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UTC_DATETIME = sa.DateTime(timezone=True)  # storage.models.UTCDateTime stores this
BIGINT_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER keys only


def upgrade() -> None:
    op.create_table(
        "draft_checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("deployment", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("learner", sa.String(length=64), nullable=False),
        sa.Column("learner_settings", sa.JSON(), nullable=False),
        sa.Column("target_identity", sa.String(length=128), nullable=False),
        sa.Column("window_first_id", sa.BigInteger(), nullable=True),
        sa.Column("window_last_id", sa.BigInteger(), nullable=True),
        sa.Column("window_rows", sa.Integer(), nullable=True),
        sa.Column("window_first_at", UTC_DATETIME, nullable=True),
        sa.Column("window_last_at", UTC_DATETIME, nullable=True),
        sa.Column("heldout_metrics", sa.JSON(), nullable=False),
        sa.Column("live_metrics", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.CheckConstraint(
            "status IN ('candidate', 'active', 'retired', 'rejected')", name=op.f("ck_draft_checkpoints_status")
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["draft_checkpoints.id"], name=op.f("fk_draft_checkpoints_parent_id_draft_checkpoints")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_draft_checkpoints")),
        sa.UniqueConstraint("version", name=op.f("uq_draft_checkpoints_version")),
    )
    op.create_index(op.f("ix_draft_checkpoints_sha256"), "draft_checkpoints", ["sha256"])

    op.create_table(
        "requests",
        sa.Column("request_id", sa.String(length=512), nullable=False),
        sa.Column("kafka_topic", sa.String(length=255), nullable=True),
        sa.Column("kafka_partition", sa.Integer(), nullable=True),
        sa.Column("kafka_offset", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("received_at", UTC_DATETIME, nullable=False),
        sa.Column("completed_at", UTC_DATETIME, nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('received', 'completed', 'failed', 'dead_lettered')", name=op.f("ck_requests_status")
        ),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_requests")),
        sa.UniqueConstraint(
            "kafka_topic",
            "kafka_partition",
            "kafka_offset",
            name=op.f("uq_requests_kafka_topic_kafka_partition_kafka_offset"),
        ),
    )

    op.create_table(
        "active_drafts",
        sa.Column("deployment", sa.String(length=64), nullable=False),
        sa.Column("checkpoint_id", sa.Integer(), nullable=True),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("changed_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"], ["draft_checkpoints.id"], name=op.f("fk_active_drafts_checkpoint_id_draft_checkpoints")
        ),
        sa.PrimaryKeyConstraint("deployment", name=op.f("pk_active_drafts")),
    )

    op.create_table(
        "completions",
        sa.Column("request_id", sa.String(length=512), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("token_ids", sa.LargeBinary(), nullable=False),
        sa.Column("finish_reason", sa.String(length=16), nullable=False),
        sa.Column("draft_version", sa.String(length=128), nullable=False),
        sa.Column("draft_steps", sa.Integer(), nullable=False),
        sa.Column("drafted", sa.Integer(), nullable=False),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column("target_forwards", sa.Integer(), nullable=False),
        sa.Column("emitted", sa.Integer(), nullable=False),
        sa.Column("accepted_at_position", sa.JSON(), nullable=False),
        sa.Column("decode_seconds", sa.Float(), nullable=False),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("message_json", sa.Text(), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"], ["requests.request_id"], name=op.f("fk_completions_request_id_requests")
        ),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_completions")),
    )
    op.create_index(op.f("ix_completions_draft_version"), "completions", ["draft_version", "created_at"])

    op.create_table(
        "draft_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("deployment", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("checkpoint_id", sa.Integer(), nullable=True),
        sa.Column("from_checkpoint_id", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("metrics", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("at", UTC_DATETIME, nullable=False),
        sa.CheckConstraint("kind IN ('promote', 'rollback', 'retire', 'reject')", name=op.f("ck_draft_events_kind")),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"], ["draft_checkpoints.id"], name=op.f("fk_draft_events_checkpoint_id_draft_checkpoints")
        ),
        sa.ForeignKeyConstraint(
            ["from_checkpoint_id"],
            ["draft_checkpoints.id"],
            name=op.f("fk_draft_events_from_checkpoint_id_draft_checkpoints"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_draft_events")),
    )
    op.create_index(op.f("ix_draft_events_deployment"), "draft_events", ["deployment"])

    op.create_table(
        "feedback",
        sa.Column("id", BIGINT_KEY, autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=512), nullable=False),
        sa.Column("draft_version", sa.String(length=128), nullable=False),
        sa.Column("target_identity", sa.String(length=128), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("prompt_len", sa.Integer(), nullable=False),
        sa.Column("n_tokens", sa.Integer(), nullable=False),
        sa.Column("top_m", sa.Integer(), nullable=False),
        sa.Column("prompt_ids", sa.LargeBinary(), nullable=False),
        sa.Column("token_ids", sa.LargeBinary(), nullable=False),
        sa.Column("kinds", sa.LargeBinary(), nullable=False),
        sa.Column("draft_tokens", sa.LargeBinary(), nullable=False),
        sa.Column("target_topk_ids", sa.LargeBinary(), nullable=False),
        sa.Column("target_topk_logprobs", sa.LargeBinary(), nullable=False),
        sa.Column("draft_steps", sa.Integer(), nullable=False),
        sa.Column("drafted", sa.Integer(), nullable=False),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column("target_forwards", sa.Integer(), nullable=False),
        sa.Column("emitted", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["request_id"], ["requests.request_id"], name=op.f("fk_feedback_request_id_requests")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
        sa.UniqueConstraint("request_id", name=op.f("uq_feedback_request_id")),
    )
    op.create_index(op.f("ix_feedback_created_at"), "feedback", ["created_at"])

    op.create_table(
        "learning_rounds",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("deployment", sa.String(length=64), nullable=False),
        sa.Column("learner", sa.String(length=64), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("target_identity", sa.String(length=128), nullable=False),
        sa.Column("window_first_id", sa.BigInteger(), nullable=True),
        sa.Column("window_last_id", sa.BigInteger(), nullable=True),
        sa.Column("window_rows", sa.Integer(), nullable=False),
        sa.Column("started_at", UTC_DATETIME, nullable=False),
        sa.Column("finished_at", UTC_DATETIME, nullable=True),
        sa.Column("duration_seconds", sa.Float(), nullable=True),
        sa.Column("decision", sa.String(length=16), nullable=True),
        sa.Column("active_checkpoint_id", sa.Integer(), nullable=True),
        sa.Column("candidate_checkpoint_id", sa.Integer(), nullable=True),
        sa.Column("candidate_metrics", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("active_metrics", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "decision IS NULL OR decision IN ('promoted', 'rejected', 'skipped', 'failed')",
            name=op.f("ck_learning_rounds_decision"),
        ),
        sa.ForeignKeyConstraint(
            ["active_checkpoint_id"],
            ["draft_checkpoints.id"],
            name=op.f("fk_learning_rounds_active_checkpoint_id_draft_checkpoints"),
        ),
        sa.ForeignKeyConstraint(
            ["candidate_checkpoint_id"],
            ["draft_checkpoints.id"],
            name=op.f("fk_learning_rounds_candidate_checkpoint_id_draft_checkpoints"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_learning_rounds")),
    )


def downgrade() -> None:
    op.drop_table("learning_rounds")
    op.drop_index(op.f("ix_feedback_created_at"), table_name="feedback")
    op.drop_table("feedback")
    op.drop_index(op.f("ix_draft_events_deployment"), table_name="draft_events")
    op.drop_table("draft_events")
    op.drop_index(op.f("ix_completions_draft_version"), table_name="completions")
    op.drop_table("completions")
    op.drop_table("active_drafts")
    op.drop_table("requests")
    op.drop_index(op.f("ix_draft_checkpoints_sha256"), table_name="draft_checkpoints")
    op.drop_table("draft_checkpoints")
