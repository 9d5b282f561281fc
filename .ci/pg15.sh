#!/usr/bin/env bash
# Run a throwaway PostgreSQL 15 server from Debian's binaries.
#
#   .ci/pg15.sh start DIR   # DIR exists (e.g. from mktemp -d); prints a DSN on stdout
#   .ci/pg15.sh stop DIR
#
# PostgreSQL refuses to run as root, so initdb and pg_ctl run as the `postgres`
# OS user (runuser when we are root), in DIR chowned to it. The server listens
# only on a Unix socket in DIR, on port PG15_PORT (default 54315).
set -euo pipefail

PG_BIN=${PG15_BIN:-/usr/lib/postgresql/15/bin}
PORT=${PG15_PORT:-54315}

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}

as_postgres() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

[ $# -eq 2 ] || usage
cmd=$1
dir=$(cd "$2" && pwd)  # absolute: the socket path goes into the DSN
data="$dir/data"

case "$cmd" in
start)
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$dir"
    fi
    if [ ! -f "$data/PG_VERSION" ]; then
        as_postgres "$PG_BIN/initdb" -D "$data" -A trust -U postgres --encoding UTF8 \
            --no-instructions >"$dir/initdb.log" 2>&1 || {
            cat "$dir/initdb.log" >&2
            exit 1
        }
    fi
    if as_postgres "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        # Already running: reuse it.
        echo "postgresql://postgres@/postgres?host=$dir&port=$PORT"
        exit 0
    fi
    as_postgres "$PG_BIN/pg_ctl" -D "$data" -w -t 60 -l "$dir/server.log" \
        -o "-c listen_addresses='' -c unix_socket_directories='$dir' -c port=$PORT" \
        -o "-c max_connections=200 -c fsync=off" \
        start >/dev/null || {
        cat "$dir/server.log" >&2
        exit 1
    }
    echo "postgresql://postgres@/postgres?host=$dir&port=$PORT"
    ;;
stop)
    if ! as_postgres "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
        echo "pg15: no server running in $data" >&2
        exit 0
    fi
    as_postgres "$PG_BIN/pg_ctl" -D "$data" -w -m fast stop >/dev/null
    ;;
*)
    usage
    ;;
esac
