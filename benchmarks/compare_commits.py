"""Wall time of one command at two commits, side by side: before and after a change.

Checks each commit out into a temporary git worktree and runs the command there with that
worktree's `src` first on PYTHONPATH (same virtualenv, same data), taking turns and reversing
the order every other round so both see the same machine load. Prints every time, the medians
and the ratio. `{out}` in the command is replaced by a fresh empty folder for every run.

Usage:
    .venv/bin/python benchmarks/compare_commits.py --base 8b2725f [--head HEAD] [--rounds 3] \\
        -- .venv/bin/finetune train examples/data/fashion_mnist --out {out} ...
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worktree(commit: str, parent: Path) -> Path:
    path = parent / commit.replace("/", "_")
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit],
        check=True, capture_output=True,
    )  # fmt: skip
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the commit before the change")
    parser.add_argument("--head", default="HEAD", help="the commit after it (default HEAD)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to time after --")
    times: dict[str, list[float]] = {args.base: [], args.head: []}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still remove the worktrees
    with tempfile.TemporaryDirectory(prefix="compare-") as scratch:
        parent = Path(scratch)
        trees: dict[str, Path] = {}
        try:
            for commit in times:
                trees[commit] = worktree(commit, parent)
            for round_ in range(args.rounds):
                order = list(times) if round_ % 2 == 0 else list(reversed(times))
                for commit in order:
                    out = Path(tempfile.mkdtemp(dir=parent))
                    env = os.environ | {"PYTHONPATH": str(trees[commit] / "src")}
                    argv = [part.replace("{out}", str(out / "run")) for part in command]
                    start = time.perf_counter()
                    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
                    elapsed = time.perf_counter() - start
                    if done.returncode != 0:
                        sys.exit(f"{commit}: exit {done.returncode}\n{done.stderr[-3000:]}")
                    times[commit].append(elapsed)
                    print(f"  round {round_ + 1}, {commit}: {elapsed:.1f} s", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                    check=False, capture_output=True,
                )  # fmt: skip
    base, head = (statistics.median(times[c]) for c in (args.base, args.head))
    print(f"\nmedian of {args.rounds}: {args.base} {base:.1f} s, {args.head} {head:.1f} s; "
          f"{args.base} / {args.head} = {base / head:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
