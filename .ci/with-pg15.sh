#!/usr/bin/env bash
# Run a command with ORCHESTRATOR_TEST_DSN pointing at a throwaway PostgreSQL 15 server.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d /tmp/orch-pg15.XXXXXX)
cleanup() {
    bash "$here/pg15.sh" stop "$dir" >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
dsn=$(bash "$here/pg15.sh" start "$dir")
echo "PostgreSQL 15 at $dsn" >&2
ORCHESTRATOR_TEST_DSN=$dsn "$@"
