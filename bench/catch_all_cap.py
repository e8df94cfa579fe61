"""What the catch-all mailbox cap costs per RCPT (ingress.delivery.maildir.MailboxCap.admit).

Makes a catch-all domain folder with N mailbox folders in a temporary folder of the current
directory (not a tmpfs) and times, per call:

- ``existing``: a RCPT to a mailbox that exists (one stat);
- ``refused``: a RCPT to a new name at the cap, the folder unchanged (stat + cached count);
- ``changed``: a RCPT to a new name right after the folder changed (a full listing);
- ``naive``: what counting by listing the folder on every RCPT would cost.

    python bench/catch_all_cap.py                 # N = 1,000 and 84,000
    python bench/catch_all_cap.py --sizes 1000 --calls 2000

Bounded: at most --calls calls per case (default 5,000; 200 for the listing cases).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ingress.delivery.maildir import MailboxCap


class Holder:
    """Stands in for a transaction (MailboxCap holds names until it is garbage)."""


def timed(calls: int, function) -> float:
    """Median of 5 rounds of the mean time per call, in microseconds."""
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(calls):
            function(i)
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


def run(size: int, calls: int, workdir: Path) -> dict[str, float]:
    folder = workdir / f"domain-{size}"
    folder.mkdir()
    for i in range(size):
        os.mkdir(folder / f"user{i}")
    old = time.time() - 60
    os.utime(folder, (old, old))
    cap = MailboxCap()
    holder = Holder()

    def existing(i: int) -> None:
        assert cap.admit(folder, f"user{i % size}", size, holder)

    def refused(i: int) -> None:
        assert not cap.admit(folder, f"new{i}", size, holder)

    def changed(i: int) -> None:
        os.utime(folder, (old + i + 1, old + i + 1))  # as a new mailbox elsewhere would
        assert not cap.admit(folder, f"new{i}", size, holder)

    def naive(i: int) -> None:
        with os.scandir(folder) as entries:
            sum(1 for e in entries if e.is_dir(follow_symlinks=False))

    result = {
        "existing": timed(calls, existing),
        "refused": timed(calls, refused),
        "changed": timed(min(calls, 200), changed),
        "naive": timed(min(calls, 200), naive),
    }
    shutil.rmtree(folder)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,84000")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--workdir", default=".")
    args = parser.parse_args()
    gc.disable()  # the Holder lives for the whole run anyway
    with tempfile.TemporaryDirectory(prefix="bench-cap-", dir=args.workdir) as tmp:
        print("| mailboxes | existing µs | refused µs | changed µs | naive listing µs | "
              "naive / refused |")
        print("|---|---|---|---|---|---|")
        for size in (int(s) for s in args.sizes.split(",")):
            r = run(size, args.calls, Path(tmp))
            print(f"| {size:,} | {r['existing']:.1f} | {r['refused']:.1f} | {r['changed']:.0f} "
                  f"| {r['naive']:.0f} | {r['naive'] / r['refused']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
