#!/usr/bin/env bash
# The test command: install, lint and format check (ruff, configured in pyproject.toml), make sure PostgreSQL is
# up, run the whole suite (SQLite and PostgreSQL, a real Kafka-protocol broker started by the tests themselves).
# Extra arguments go to pytest.
#   bash scripts/test.sh [-k expr] [-x] ...
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "test: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
# PostgreSQL tests fail instead of skipping when the server cannot be reached.
export ONLINESPEC_REQUIRE_POSTGRES=1
exec .venv/bin/python -m pytest -q "$@"
