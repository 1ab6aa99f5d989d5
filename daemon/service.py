"""Wiring: settings → database check → models and engine (warmed up) → draft follower → Worker → learning
scheduler (rounds when learning.enabled, the live guard when learning.live_guard.enabled). Nothing here runs at
import."""

from __future__ import annotations

import logging

from daemon.config import Settings
from daemon.learning.draft_follower import BASE_DRAFT_VERSION, DraftFollower, DraftWeights, cast_like
from daemon.serving.ledger import BatchStore
from daemon.serving.metrics import DaemonMetrics
from daemon.serving.systemd import SystemdNotifier
from daemon.serving.worker import Worker

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to fix. `exit_code` is what the process returns."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def open_database(settings: Settings):
    """Engine and session factory for the configured URL; refuses a schema that is not at head."""
    from sqlalchemy.exc import OperationalError

    from storage.db import display_url, make_engine, make_session_factory
    from storage.errors import DatabaseNotFoundError, DatabaseURLError, SchemaNotAtHeadError
    from storage.migrate import assert_at_head, upgrade_to_head

    url = settings.database.url.get_secret_value()
    masked = display_url(url)
    try:
        if settings.database.auto_migrate:
            upgrade_to_head(url)
        engine = make_engine(url, must_exist=True)  # only a migration creates a SQLite file
        try:
            assert_at_head(engine)
        except BaseException:
            engine.dispose()
            raise
    except (SchemaNotAtHeadError, DatabaseNotFoundError) as exc:
        raise StartupError(f"{exc} (or start the daemon with `serve --auto-migrate`)", exit_code=3) from None
    except DatabaseURLError as exc:
        raise StartupError(str(exc), exit_code=2) from None
    except OperationalError as exc:
        # Exit non-zero: under systemd, Restart=on-failure tries again after RestartSec.
        raise StartupError(f"database {masked} is unreachable: {exc.orig or exc}", exit_code=1) from None
    return engine, make_session_factory(engine)


def build_engine(settings: Settings):
    """Load target (and draft), build the speculative engine and warm it up before any record is consumed."""
    from pipelines.engine import SpeculativeEngine
    from pipelines.models import IncompatibleModelsError, ModelLoadError, load_pair, model_identity

    models = settings.models
    if not models.target:
        raise StartupError("no target model: set models.target in the config or pass --target", exit_code=2)
    try:
        target, draft, tokenizer = load_pair(
            models.target,
            models.draft,
            models.dtype,
            models.device,
            head_layers=models.head_layers,
            head_feature_layers=tuple(models.head_feature_layers),
        )
    except (ModelLoadError, IncompatibleModelsError) as exc:
        raise StartupError(str(exc), exit_code=2) from None
    try:
        engine = SpeculativeEngine(target, draft, tokenizer, settings.engine, draft_version=BASE_DRAFT_VERSION)
    except ValueError as exc:  # e.g. proposer draft or hybrid without a draft model
        raise StartupError(f"engine: {exc}", exit_code=2) from None
    engine.warmup()
    return engine, tokenizer, model_identity(target)


def build_worker(settings: Settings, notifier: SystemdNotifier | None = None) -> Worker:
    notifier = notifier or SystemdNotifier()
    notifier.status("checking the database schema")
    db_engine, session_factory = open_database(settings)
    if settings.learning.enabled and not settings.models.draft:
        raise StartupError("learning.enabled needs a draft model (models.draft or --draft)", exit_code=2)
    notifier.status("loading models")
    engine, tokenizer, target_identity = build_engine(settings)
    store = BatchStore(
        session_factory,
        target_identity=target_identity,
        keep_dead_letter_values=settings.limits.keep_dead_letter_values,
    )
    follower = weights = None
    if engine.draft is not None:
        weights = DraftWeights.of_draft(engine.draft, settings.learning.checkpoint_dir)
        follower = DraftFollower(
            session_factory,
            weights,
            target_identity=target_identity,
            deployment=settings.learning.deployment,
            interval_s=settings.learning.follow_interval_ms / 1000,
            retry_s=settings.daemon.retry_max_s,
            prepare=cast_like(engine.draft),
        )
        follower.sync(engine)
    log.info(
        "target identity %s, draft version %s, max prompt tokens %d",
        target_identity,
        engine.draft_version,
        engine.max_prompt_tokens,
    )
    warm_start_suffix_cache(engine, session_factory, target_identity)
    worker = Worker(settings, engine, tokenizer, store, metrics=DaemonMetrics(), notifier=notifier, follower=follower)
    if engine.draft is not None:
        worker.learning = build_learning(
            settings,
            db_engine,
            session_factory,
            engine.draft,
            weights,
            target_identity,
            worker.serving_counters,
            window=getattr(engine.model_proposer, "window", None),  # a head's catch-up window; a draft LM has none
        )
    return worker


def warm_start_suffix_cache(engine, session_factory, target_identity: str) -> None:
    """A restart keeps what the stream taught the suffix proposer: the newest stored completions of this target
    (half the ring: the prompt tails stored beside them take room too) go back into its cache."""
    import time

    from storage.feedback_repo import recent_streams

    if engine.suffix is None:
        return
    started = time.monotonic()
    with session_factory() as session:
        streams = recent_streams(
            session, target_identity=target_identity, max_tokens=engine.settings.suffix.cache_tokens // 2
        )
    written = engine.add_to_stream([emitted for _, emitted in streams], [prompt for prompt, _ in streams])
    log.info(
        "suffix proposer: %d stored completions (%d ring tokens) loaded in %.1f s",
        len(streams),
        written,
        time.monotonic() - started,
    )


def build_learning(
    settings: Settings,
    db_engine,
    session_factory,
    draft,
    weights: DraftWeights,
    target_identity: str,
    serving_counters,
    window: int | None = None,
):
    """The learning scheduler: rounds when learning.enabled, the live guard when live_guard.enabled; else None.
    `window`: the engine's head catch-up window (its max k + 1), so a head's replay drafts exactly as served."""
    from daemon.learning.learner_lock import LearnerLock
    from daemon.learning.live_guard import LiveGuard
    from daemon.learning.rounds import RoundRunner
    from daemon.learning.scheduler import LearningScheduler

    learning = settings.learning
    runner = lock = guard = None
    if learning.enabled:
        import pipelines.learners  # noqa: F401  imported now, not in the first round

        lock = LearnerLock(db_engine, learning.deployment)
        runner = RoundRunner(
            settings,
            session_factory,
            weights,
            draft,
            target_identity=target_identity,
            serving=serving_counters,
            window=window,
        )
        check_learning_memory(settings, draft, runner.device)
    if learning.live_guard.enabled:
        guard = LiveGuard(learning.live_guard, session_factory, deployment=learning.deployment)
    if runner is None and guard is None:
        return None
    return LearningScheduler(
        settings, session_factory, target_identity=target_identity, lock=lock, runner=runner, guard=guard
    )


def check_learning_memory(settings: Settings, draft, device: str) -> None:
    """Say at start what learning rounds will hold in memory, and warn when it does not fit (daemon.learning.memory)."""
    from daemon.learning.memory import check, estimate
    from pipelines.drafts import training_dtype
    from pipelines.host_memory import available_ram_bytes

    dtype = training_dtype(draft, settings.learning.training_dtype)
    check(estimate(draft, settings.learning.learner, dtype), device, available_ram_bytes())
