"""`onlinespec db upgrade | current` and `onlinespec feedback prune`.

The database URL comes from --database-url, else from --config (where $ONLINESPEC_DATABASE_URL overrides the
file), else $ONLINESPEC_DATABASE_URL, else sqlite:///var/onlinespec.db relative to the working directory.
"""

from __future__ import annotations

import argparse
import re
from datetime import timedelta

from daemon.cli.options import add_database_options, database_errors, database_url
from storage.db import make_engine, make_session_factory, masked

DURATION = re.compile(r"^(\d+)([smhdw])$")
DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
PRUNE_BATCH_ROWS = 5_000  # rows per transaction: keeps locks short while the worker keeps writing


def register(subparsers) -> None:
    db = subparsers.add_parser("db", help="database schema: upgrade, current")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="create or upgrade the schema to the latest revision")
    add_database_options(upgrade)
    upgrade.set_defaults(func=run_upgrade)
    current = db_commands.add_parser("current", help="show the schema revision of the database and the latest")
    add_database_options(current)
    current.add_argument("--check", action="store_true", help="exit with status 1 unless the schema is at head")
    current.set_defaults(func=run_current)

    feedback = subparsers.add_parser("feedback", help="feedback retention")
    feedback_commands = feedback.add_subparsers(dest="feedback_command", required=True)
    prune = feedback_commands.add_parser(
        "prune", help="delete old feedback rows, keeping those an unfinished learning round still needs"
    )
    add_database_options(prune)
    prune.add_argument("--older-than", required=True, type=parse_duration, help="age such as 7d, 12h, 2w")
    prune.set_defaults(func=run_prune)


def parse_duration(text: str) -> timedelta:
    match = DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration like 7d, 12h, 30m, 2w; got {text!r}")
    amount, unit = match.groups()
    if int(amount) == 0:
        raise argparse.ArgumentTypeError(f"the age must be positive, got {text!r}")
    return timedelta(**{DURATION_UNITS[unit]: int(amount)})


def run_upgrade(args) -> int:
    from storage.migrate import current_revision, head_revision, upgrade_to_head

    url = database_url(args)
    with database_errors(url):
        before = current_revision(url)
        upgrade_to_head(url)
    print(f"{masked(url)}: schema {before or 'empty'} -> {head_revision()}")
    return 0


def run_current(args) -> int:
    from storage.migrate import current_revision, head_revision

    url = database_url(args)
    with database_errors(url):
        current, head = current_revision(url, must_exist=True), head_revision()
    note = "(head)" if current == head else f"(head is {head}; run `onlinespec db upgrade`)"
    print(f"{masked(url)}: {current or 'empty'} {note}")
    return 1 if args.check and current != head else 0


def run_prune(args) -> int:
    from storage.feedback_repo import prune_feedback
    from storage.migrate import assert_at_head

    url = database_url(args)
    total = 0
    with database_errors(url):
        engine = make_engine(url, must_exist=True)
        try:
            assert_at_head(engine)
            session_factory = make_session_factory(engine)
            while True:  # short transactions: the worker keeps writing meanwhile
                with session_factory.begin() as session:
                    deleted = prune_feedback(session, args.older_than, limit=PRUNE_BATCH_ROWS)
                total += deleted
                if deleted < PRUNE_BATCH_ROWS:
                    break
        finally:
            engine.dispose()
    age = f"{args.older_than.total_seconds() / 86400:g} days"
    print(f"{masked(url)}: deleted {total} feedback rows older than {age}")
    return 0
