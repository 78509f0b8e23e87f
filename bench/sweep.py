"""Many seeds of several growth variants at once: a pool of bench/suite.py runs, then paired differences.

    python bench/sweep.py run JOBS --workers 14 --stop-after 420 --out bench/out/sweep [suite flags]
    python bench/sweep.py table bench/out/sweep/results.jsonl --against g5M-base,g5M-fixed/shallow

A variant is worth a default only when its lead over seeds is more than their spread (bench/RESULTS.md:
five seeds once showed +0.72 for a change worth -0.12). Ten or twenty seeds of four variants are a day
of CPU time here, but minutes on a lent GPU machine with its 16 cores; this runs them there.

Each line of JOBS is `NAME SEED BUDGET ROWS [more suite flags]`, for example
`g5M-fresh 3 5M grown --widen-init fresh`: it runs `bench/suite.py --budget-flops BUDGET --rows ROWS
--only-seed SEED --out OUT/NAME` with the flags given here and on the line, one thread per process. Each
finished row appends one JSON line (the suite's result, its spec left out, plus name, row, seed, budget)
to OUT/results.jsonl. Jobs start in file order, so list them seed by seed to make a cut-off run give
every variant the same seeds; none starts after --stop-after seconds.

Name variants SCENARIO-VARIANT (g5M-base, g5M-fresh, r5-base): `table` prints each variant (NAME, or
NAME/ROW for rows other than grown) with its mean and, for each --against variant of the same SCENARIO
(the part of the name before the first '-'), the paired difference with its 95% interval
(bench/suite.py's `paired`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import paired  # noqa: E402

SUITE = Path(__file__).resolve().parent / "suite.py"


def run_job(line: str, out: Path, flags: list[str], deadline: float, lock: threading.Lock) -> str:
    """One job line; returns what happened, for the log."""
    if time.monotonic() > deadline:
        return f"skipped (past --stop-after): {line}"
    name, seed, budget, rows, *more = line.split()
    cmd = [sys.executable, str(SUITE), "--budget-flops", budget, "--rows", rows, "--only-seed", seed,
           "--out", str(out / name), *flags, *more]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    for row in rows.split(","):
        path = out / name / f"seed-{seed}" / f"{row}.json"
        if not path.exists():
            return f"FAILED {line}: {done.stderr.strip().splitlines()[-1:] or done.returncode}"
        result = json.loads(path.read_text())
        result.pop("spec", None)
        lines.append(json.dumps({**result, "name": name, "row": row, "seed": int(seed), "budget": budget}))
    with lock, open(out / "results.jsonl", "a") as f:
        f.write("".join(entry + "\n" for entry in lines))
    return f"{name} seed {seed} {rows}: {time.monotonic() - start:.0f} s"


def run(args: argparse.Namespace, flags: list[str]) -> None:
    jobs = [line.strip() for line in Path(args.jobs).read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline, lock, start = time.monotonic() + args.stop_after, threading.Lock(), time.monotonic()
    with ThreadPoolExecutor(args.workers) as pool:  # logged as they finish, so the clock is each job's end
        futures = [pool.submit(run_job, job, out, flags, deadline, lock) for job in jobs]
        for future in as_completed(futures):
            print(f"{time.monotonic() - start:5.0f} s  {future.result()}", flush=True)


def table(args: argparse.Namespace) -> None:
    entries = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    per_seed: dict[int, dict[str, dict]] = {}
    scenarios: dict[str, tuple[str, str]] = {}
    for e in entries:  # a variant is its name, and the row where it is not the grown one
        key = e["name"] if e["row"] == "grown" else f"{e['name']}/{e['row']}"
        per_seed.setdefault(e["seed"], {})[key] = e
        scenarios[key] = (e["name"].split("-")[0], e["budget"])
    against = [a for a in args.against.split(",") if a]
    for name in sorted(scenarios, key=lambda n: (scenarios[n], n)):
        accs = [100 * r[name]["test_accuracy"] for r in per_seed.values() if name in r]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{name:24s} {len(accs):3d} seeds  {statistics.fmean(accs):6.2f} +- {spread:.2f}")
        for base in against:
            if base != name and scenarios.get(base) == scenarios[name]:
                d = paired(per_seed, name, base)
                if d is not None and d["low"] is not None:
                    print(f"{'':24s} - {base}: {100 * d['mean']:+.2f} (95% CI {100 * d['low']:+.2f} to "
                          f"{100 * d['high']:+.2f}, {d['seeds']} paired seeds)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the jobs; flags after the known ones go to every suite run")
    r.add_argument("jobs")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--stop-after", type=float, default=float("inf"), help="start no job after this many seconds")
    r.add_argument("--out", default="bench/out/sweep")
    t = sub.add_parser("table", help="means and paired differences of a results.jsonl")
    t.add_argument("results")
    t.add_argument("--against", default="", help="comma-separated variants to difference against")
    args, flags = parser.parse_known_args()
    if args.command == "table":
        if flags:
            parser.error(f"unknown arguments: {' '.join(flags)}")
        table(args)
    else:
        run(args, flags)


if __name__ == "__main__":
    main()
