"""Benchmarks: copy throughput, dual-write overhead, cutover stall and planning scale.

Run with `python -m bench` (or `make bench`). Each benchmark starts a server of its own
(embedded PostgreSQL 18 in a mktemp directory, or Debian's PostgreSQL 15 for pg_repack),
creates its database, measures the compared variants in one run on that one server, writes
bench/results/<name>.json and regenerates docs/benchmarks.md from every result file present.
Speed is measured here, never asserted in a timed test.
"""
