"""Wiring: settings → database check → models and engine (warmed up) → Worker. Nothing here runs at import."""

from __future__ import annotations

import logging

from daemon.config import Settings
from daemon.metrics import DaemonMetrics
from daemon.store import BatchStore
from daemon.systemd import SystemdNotifier
from daemon.worker import Worker

log = logging.getLogger(__name__)

BASE_DRAFT_VERSION = "base"


class StartupError(RuntimeError):
    """The daemon cannot start; the message says what to fix. `exit_code` is what the process returns."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def open_database(settings: Settings):
    """Engine and session factory for the configured URL; refuses a schema that is not at head."""
    from sqlalchemy.exc import OperationalError

    from storage.db import make_engine, make_session_factory, masked
    from storage.errors import SchemaNotAtHeadError
    from storage.migrate import assert_at_head, upgrade_to_head

    url = settings.database.url.get_secret_value()
    try:
        if settings.database.auto_migrate:
            upgrade_to_head(url)
        engine = make_engine(url)
        try:
            assert_at_head(engine)
        except BaseException:
            engine.dispose()
            raise
    except SchemaNotAtHeadError as exc:
        raise StartupError(f"{exc} (or start the daemon with `serve --auto-migrate`)", exit_code=3) from None
    except OperationalError as exc:
        # Exit non-zero: under systemd, Restart=on-failure tries again after RestartSec.
        raise StartupError(f"database {masked(url)} is unreachable: {exc.orig or exc}", exit_code=1) from None
    return engine, make_session_factory(engine)


def build_engine(settings: Settings):
    """Load target (and draft), build the speculative engine and warm it up before any record is consumed."""
    from pipelines.engine import EngineSettings, SpeculativeEngine
    from pipelines.models import IncompatibleModelsError, ModelLoadError, load_pair, model_identity

    models = settings.models
    if not models.target:
        raise StartupError("no target model: set models.target in the config or pass --target", exit_code=2)
    try:
        target, draft, tokenizer = load_pair(models.target, models.draft, models.dtype, models.device)
    except (ModelLoadError, IncompatibleModelsError) as exc:
        raise StartupError(str(exc), exit_code=2) from None
    engine_settings = EngineSettings(
        k=settings.engine.k,
        max_batch_size=settings.batching.max_batch_size,
        max_seq_len=settings.engine.max_seq_len,
        top_m=settings.engine.top_m,
        device=models.device,
        cuda_graphs=settings.engine.cuda_graphs,
        compile=settings.engine.compile,
    )
    engine = SpeculativeEngine(target, draft, tokenizer, engine_settings, draft_version=BASE_DRAFT_VERSION)
    engine.warmup()
    return engine, tokenizer, model_identity(target)


def build_worker(settings: Settings, notifier: SystemdNotifier | None = None) -> Worker:
    notifier = notifier or SystemdNotifier()
    notifier.status("checking the database schema")
    db_engine, session_factory = open_database(settings)
    notifier.status("loading models")
    engine, tokenizer, target_identity = build_engine(settings)
    store = BatchStore(session_factory, target_identity=target_identity)
    log.info("target identity %s, draft version %s, max prompt tokens %d", target_identity, engine.draft_version,
             engine.max_prompt_tokens)  # fmt: skip
    return Worker(settings, engine, tokenizer, store, metrics=DaemonMetrics(), notifier=notifier)
