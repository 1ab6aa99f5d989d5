"""Storage: everything the daemon learns from and everything it can roll back to.

    db               make_engine(url), make_session_factory(engine), resolve_database_url()
    models           typed SQLAlchemy models, the naming convention, status enums
    packing          feedback arrays <-> raw little-endian bytes
    requests_repo    record_request(s)_received, find_completion(s), store_results, mark_dead_lettered,
                     readmit_dead_lettered
    dead_letters_repo record_dead_letters, dead_letters_at
    feedback_repo    feedback_since / feedback_window / recent_feedback / feedback_totals_since for the learner;
                     prune_feedback
    checkpoints_repo add_checkpoint, set_active, rollback, reject, get_active_checkpoint, live_counters,
                     current_activation
    rounds_repo      start_round, finish_round, fail_unfinished_rounds, list_rounds, last_window_end
    migrate          upgrade_to_head, current_revision, assert_at_head (Alembic scripts in `migrations/`)
    artifacts        CheckpointStore: sha256-addressed safetensors files, atomic writes, verified loads
    errors           typed exceptions

Repository functions take a session first and never commit: the caller owns the unit of work
(`with session_factory.begin() as session:`). No engine is built at import time, and torch is only imported
inside `artifacts` methods.
"""
