"""`onlinespec checkpoints list | show ID | promote ID | rollback [--to ID]`: draft versions for operators.

ID is a checkpoint id or a version label; `base` names the draft given in models.draft (promote and rollback
--to take it; it has no stored record to show). Every command takes --json, and the database options of
`onlinespec db` (--database-url, --config, else $ONLINESPEC_DATABASE_URL). Live numbers (list, show) are the
counters of every completion stamped with the version, the same ones the live guard and `status` read.
Promote and rollback only move the deployment's active pointer (recorded with actor "operator:$USER" and the
--reason), after hashing the weights file of the version they move to (a damaged one is refused; --no-verify
skips the check); every running daemon of the deployment swaps its draft at its next round boundary, loading
the version's file by its sha256, so a rollback serves exactly the weights that were recorded.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from pathlib import Path

from daemon.cli.errors import CommandError
from daemon.cli.options import add_deployment_options, deployment_of, print_table, session_scope
from daemon.learning.draft_follower import BASE_DRAFT_VERSION


def register(subparsers) -> None:
    parser = subparsers.add_parser("checkpoints", help="draft versions: list, show, promote, rollback")
    commands = parser.add_subparsers(dest="checkpoints_command", required=True)

    listing = commands.add_parser("list", help="draft versions, newest first, with the active one marked")
    add_deployment_options(listing)
    listing.add_argument("--status", choices=["candidate", "active", "retired", "rejected"])
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(func=run_list)

    show = commands.add_parser("show", help="one version: provenance, metrics, live counters, events")
    add_deployment_options(show)
    show.add_argument("checkpoint", help="checkpoint id or version label")
    show.add_argument("--verify", action="store_true", help="hash the weights file and compare with its sha256")
    show.set_defaults(func=run_show)

    promote = commands.add_parser("promote", help="make a version the active draft of the deployment")
    add_deployment_options(promote)
    promote.add_argument("checkpoint", help="checkpoint id, version label, or `base`")
    promote.add_argument("--reason", default="promoted by an operator", help="recorded with the event")
    promote.add_argument("--force", action="store_true", help="promote a version that was rejected")
    promote.add_argument("--no-verify", action="store_true", help="skip hashing the weights file first")
    promote.set_defaults(func=run_promote)

    rollback = commands.add_parser("rollback", help="return to the version the active one replaced (or --to)")
    add_deployment_options(rollback)
    rollback.add_argument("--to", dest="to", help="checkpoint id, version label, or `base`")
    rollback.add_argument("--reason", default="rolled back by an operator", help="recorded with the event")
    rollback.add_argument("--no-verify", action="store_true", help="skip hashing the weights file first")
    rollback.set_defaults(func=run_rollback)


def operator() -> str:
    return f"operator:{os.environ.get('USER') or getpass.getuser()}"


def checkpoint_ref(text: str) -> int | str:
    return int(text) if text.isdigit() else text


# ---------------------------------------------------------------------------------------------- rendering


def checkpoint_dict(row, active_id: int | None) -> dict:
    return {
        "id": row.id,
        "version": row.version,
        "deployment": row.deployment,
        "status": row.status,
        "active": row.id == active_id,
        "parent_id": row.parent_id,
        "sha256": row.sha256,
        "size_bytes": row.size_bytes,
        "path": row.path,
        "kind": row.kind,
        "learner": row.learner,
        "learner_settings": row.learner_settings,
        "target_identity": row.target_identity,
        "window": {"first_id": row.window_first_id, "last_id": row.window_last_id, "rows": row.window_rows},
        "heldout_metrics": row.heldout_metrics,
        "live_metrics": row.live_metrics,
        "reason": row.reason,
        "created_at": row.created_at.isoformat(),
    }


def event_dict(event, versions: dict[int | None, str]) -> dict:
    return {
        "id": event.id,
        "kind": event.kind,
        "version": versions.get(event.checkpoint_id),
        "checkpoint_id": event.checkpoint_id,
        "from_version": versions.get(event.from_checkpoint_id),
        "from_checkpoint_id": event.from_checkpoint_id,
        "actor": event.actor,
        "reason": event.reason,
        "metrics": event.metrics,
        "at": event.at.isoformat(),
    }


def live_dict(live) -> dict:
    """storage.checkpoints_repo.LiveCounters as shown by list, show and status: raw counters plus AvgLen."""
    return {
        "requests": live.requests,
        "drafted": live.drafted,
        "accepted": live.accepted,
        "target_forwards": live.target_forwards,
        "emitted": live.emitted,
        "avg_len": live.mean_accepted_length,
    }


def _avg_len(metrics: dict | None) -> str:
    value = (metrics or {}).get("avg_len")
    return "-" if value is None else f"{value:.3f}"


def _live(counters: dict) -> str:
    return "-" if not counters["requests"] else f"{counters['avg_len']:.3f} ({counters['requests']})"


def _versions(session, ids) -> dict[int | None, str]:
    from storage.checkpoints_repo import get_checkpoint

    return {None: BASE_DRAFT_VERSION, **{i: get_checkpoint(session, i).version for i in set(ids) if i is not None}}


# ---------------------------------------------------------------------------------------------- commands


def run_list(args) -> int:
    from storage.checkpoints_repo import get_active_pointer, list_checkpoints, live_counters_by_version

    deployment = deployment_of(args)
    with session_scope(args) as session:
        pointer = get_active_pointer(session, deployment)
        active_id = None if pointer is None else pointer.checkpoint_id
        checkpoints = list_checkpoints(session, deployment=deployment, status=args.status, limit=args.limit)
        live = live_counters_by_version(session, [row.version for row in checkpoints])
        rows = [
            {**checkpoint_dict(row, active_id), "live_counters": live_dict(live[row.version])} for row in checkpoints
        ]
    if args.json:
        listing = {
            "deployment": deployment,
            "active_checkpoint_id": active_id,
            "active_version": _active_label(rows, active_id),
            "checkpoints": rows,
        }
        print(json.dumps(listing, indent=2))
        return 0
    print(f"deployment {deployment}: active {_active_label(rows, active_id)}")
    print_table(
        [
            [
                ("* " if r["active"] else "  ") + str(r["id"]),
                r["version"],
                r["status"],
                str(r["parent_id"] or "base"),
                r["learner"],
                _avg_len(r["heldout_metrics"]),
                _live(r["live_counters"]),
                r["sha256"][:12],
                r["created_at"][:19],
            ]
            for r in rows
        ],
        ["  id", "version", "status", "parent", "learner", "heldout", "live (requests)", "sha256", "created"],
    )
    return 0


def _active_label(rows: list[dict], active_id: int | None) -> str:
    if active_id is None:
        return BASE_DRAFT_VERSION
    return next((r["version"] for r in rows if r["id"] == active_id), f"checkpoint {active_id}")


def run_show(args) -> int:
    from storage.checkpoints_repo import get_active_pointer, get_checkpoint, list_events, live_counters

    if args.checkpoint == BASE_DRAFT_VERSION:
        raise CommandError(
            "`base` is the draft of models.draft, not a stored checkpoint: there is no record to show "
            "(`checkpoints list` and `status` show whether it is active and its live AvgLen)"
        )
    with session_scope(args) as session:
        row = get_checkpoint(session, checkpoint_ref(args.checkpoint))
        pointer = get_active_pointer(session, row.deployment)
        data = checkpoint_dict(row, None if pointer is None else pointer.checkpoint_id)
        lineage, parent = [], row.parent_id
        while parent is not None:
            ancestor = get_checkpoint(session, parent)
            lineage.append(ancestor.version)
            parent = ancestor.parent_id
        data["lineage"] = lineage + [BASE_DRAFT_VERSION]
        live = live_counters(session, row.version)
        data["live_counters"] = live_dict(live)
        events = [
            e
            for e in list_events(session, deployment=row.deployment, limit=10_000)
            if row.id in (e.checkpoint_id, e.from_checkpoint_id)
        ]
        versions = _versions(session, [e.checkpoint_id for e in events] + [e.from_checkpoint_id for e in events])
        data["events"] = [event_dict(e, versions) for e in events]
    if args.verify:
        data["verified"] = _verify(data["path"], data["sha256"])
    if args.json:
        print(json.dumps(data, indent=2))
        return 0 if data.get("verified", True) else 1
    print(
        f"{data['version']} (id {data['id']}, deployment {data['deployment']}): {data['status']}"
        f"{' and active' if data['active'] else ''}"
    )
    print(f"  lineage   {' <- '.join([data['version'], *data['lineage']])}")
    print(
        f"  weights   {data['path']} ({data['size_bytes']} bytes, sha256 {data['sha256']})"
        + ("" if "verified" not in data else f", verified: {data['verified']}")
    )
    print(f"  learner   {data['learner']} {json.dumps(data['learner_settings'], sort_keys=True)}")
    window = data["window"]
    print(
        f"  window    feedback {window['first_id']}..{window['last_id']} ({window['rows']} rows), "
        f"target {data['target_identity']}"
    )
    print(
        f"  heldout   AvgLen {_avg_len(data['heldout_metrics'])}; live AvgLen {live.mean_accepted_length:.3f} "
        f"over {live.requests} requests"
    )
    print(f"  reason    {data['reason']}")
    for event in data["events"]:
        print(
            f"  {event['at'][:19]}  {event['kind']:<8} {event['from_version']} -> {event['version']}  "
            f"by {event['actor']}: {event['reason']}"
        )
    return 0 if data.get("verified", True) else 1


def _verify(path: str, sha256: str) -> bool:
    from storage.artifacts import CheckpointStore
    from storage.errors import StorageError

    try:
        CheckpointStore(Path(path).parent).verify(sha256)
        return True
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False


def run_promote(args) -> int:
    from storage.checkpoints_repo import get_checkpoint, set_active
    from storage.models import CheckpointStatus, EventKind

    with session_scope(args) as session:
        deployment = deployment_of(args)
        target = None
        if args.checkpoint != BASE_DRAFT_VERSION:
            target = get_checkpoint(session, checkpoint_ref(args.checkpoint))
            if target.status == CheckpointStatus.REJECTED and not args.force:
                raise CommandError(
                    f"{target.version} was rejected ({target.reason}); pass --force to promote it anyway"
                )
            if not args.no_verify and not _verify(target.path, target.sha256):
                return 1
        event = set_active(
            session,
            None if target is None else target.id,
            operator(),
            args.reason,
            EventKind.PROMOTE,
            deployment=deployment,
        )
        result = event_dict(event, _versions(session, [event.checkpoint_id, event.from_checkpoint_id]))
    _print_move(args, result)
    return 0


def run_rollback(args) -> int:
    from storage.checkpoints_repo import get_checkpoint, rollback

    with session_scope(args) as session:
        deployment = deployment_of(args)
        to_base = args.to == BASE_DRAFT_VERSION
        to_id = None if args.to is None or to_base else get_checkpoint(session, checkpoint_ref(args.to)).id
        event = rollback(session, to_id, to_base=to_base, actor=operator(), reason=args.reason, deployment=deployment)
        if event.checkpoint_id is not None and not args.no_verify:
            target = get_checkpoint(session, event.checkpoint_id)
            if not _verify(target.path, target.sha256):  # raising here rolls the pointer move back
                raise CommandError(f"not rolling back to {target.version}: its weights file is damaged")
        result = event_dict(event, _versions(session, [event.checkpoint_id, event.from_checkpoint_id]))
    _print_move(args, result)
    return 0


def _print_move(args, event: dict) -> None:
    if args.json:
        print(json.dumps(event, indent=2))
    else:
        print(
            f"{event['kind']}: {event['from_version']} -> {event['version']} by {event['actor']} "
            f"({event['reason']}); running daemons swap at their next batch"
        )
