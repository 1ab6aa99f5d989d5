"""`onlinespec rounds list`: learning rounds, newest first, with their decision and the numbers behind it."""

from __future__ import annotations

import json

from daemon.cli.options import add_deployment_options, deployment_of, print_table, session_scope


def register(subparsers) -> None:
    parser = subparsers.add_parser("rounds", help="learning rounds: list")
    commands = parser.add_subparsers(dest="rounds_command", required=True)
    listing = commands.add_parser("list", help="rounds, newest first: window, decision, held-out AvgLen")
    add_deployment_options(listing)
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(func=run_list)


def round_dict(row, versions: dict[int, str]) -> dict:
    candidate, active = row.candidate_metrics or {}, row.active_metrics or {}
    return {
        "id": row.id,
        "deployment": row.deployment,
        "learner": row.learner,
        "decision": row.decision,
        "window": {"first_id": row.window_first_id, "last_id": row.window_last_id, "rows": row.window_rows},
        "active_checkpoint_id": row.active_checkpoint_id,
        "candidate_checkpoint_id": row.candidate_checkpoint_id,
        "candidate_version": versions.get(row.candidate_checkpoint_id),
        "candidate_avg_len": candidate.get("avg_len"),
        "active_avg_len": active.get("avg_len"),
        "heldout_tokens": active.get("tokens"),
        "reason": candidate.get("reason"),
        "candidate_metrics": candidate,
        "active_metrics": active,
        "error": row.error,
        "started_at": row.started_at.isoformat(),
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
        "duration_seconds": row.duration_seconds,
        "target_identity": row.target_identity,
    }


def run_list(args) -> int:
    from storage.checkpoints_repo import get_checkpoint
    from storage.rounds_repo import list_rounds

    deployment = deployment_of(args)
    with session_scope(args) as session:
        rows = list_rounds(session, deployment=deployment, limit=args.limit)
        versions = {
            r.candidate_checkpoint_id: get_checkpoint(session, r.candidate_checkpoint_id).version
            for r in rows
            if r.candidate_checkpoint_id is not None
        }
        rounds = [round_dict(row, versions) for row in rows]
    if args.json:
        print(json.dumps({"deployment": deployment, "rounds": rounds}, indent=2))
        return 0

    def number(value, pattern="{:.3f}"):
        return "-" if value is None else pattern.format(value)

    print_table(
        [
            [
                str(r["id"]),
                r["started_at"][:19],
                r["learner"],
                r["decision"] or "running",
                f"{r['window']['first_id']}..{r['window']['last_id']} ({r['window']['rows']})",
                r["candidate_version"] or "-",
                number(r["candidate_avg_len"]),
                number(r["active_avg_len"]),
                number(r["heldout_tokens"], "{}"),
                number(r["duration_seconds"], "{:.1f}s"),
                (r["error"] or r["reason"] or "")[:80],
            ]
            for r in rounds
        ],
        [
            "id",
            "started",
            "learner",
            "decision",
            "window",
            "candidate",
            "cand_avglen",
            "active_avglen",
            "tokens",
            "took",
            "why",
        ],
    )
    return 0
