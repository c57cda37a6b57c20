"""Wall-clock time of whole `finetune` commands, each in a fresh process, as a user runs them.

Variants, taking turns within every round (so each round's figures are side by side):

- `help`: `finetune --help`.
- `predict, kept conversion`: `finetune predict RUN IMAGE` with the run's conversion linked to
  its `model.keras` (`finetune.kept`): no TensorFlow in the process.
- `predict, through the run's model`: the same command with the link deleted just before, so
  that it loads the run's Keras model (and TensorFlow) and the kept conversion by the model's
  digest: what every `predict` of a run did before the link (and it writes the link again).
- `predict --runtime keras`: the run's Keras model computes.
- `python -m finetune --help`: the package imported at once, as `import finetune` does.

The run is used in place, read only; conversions and links go to a temporary cache
(`FINETUNE_CACHE_DIR`), so the user's cache is untouched. One `predict` before the rounds
converts the model into it (reported, not in the medians). Times are measured from this script
around `subprocess.run` (interpreter start included). Prints medians and each variant's time
relative to `through the run's model`; writes every time to
`benchmarks/out/command_latency-<time>.json`.

Usage:
    .venv/bin/python benchmarks/command_latency.py [--run runs/demo] [--image FILE] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = Path(sys.executable).with_name("finetune")


def timed(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--image", type=Path, default=None, help="default: one of the run's")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not (args.run / "model.keras").is_file():
        sys.exit(f"{args.run} is not a finished run: train one (`make demo` writes runs/demo)")
    image = args.image or min((REPO / "examples" / "data" / "fashion_mnist").rglob("*.png"))
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, FINETUNE_CACHE_DIR=cache)
        predict = [str(COMMAND), "predict", str(args.run), str(image)]
        first = timed(predict, env)  # converts into the empty cache, and links
        links = list(Path(cache, "openvino").glob("*.run"))  # finetune.kept's link, the only one
        if len(links) != 1:
            sys.exit(
                "predict linked no conversion: on a CPU without bfloat16, `auto` predicts one "
                "image in Keras (try FINETUNE_RUNTIME=openvino)"
            )
        link = links[0]
        variants = {
            "help": [str(COMMAND), "--help"],
            "predict, kept conversion": predict,
            "predict, through the run's model": predict,
            "predict --runtime keras": [*predict, "--runtime", "keras"],
            "python -m finetune --help": [sys.executable, "-m", "finetune", "--help"],
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, command in variants.items():
                if name == "predict, through the run's model":
                    link.unlink()
                times[name].append(timed(command, env))
                if not link.is_file():
                    sys.exit(f"{name}: the link was not written again")
    base = statistics.median(times["predict, through the run's model"])
    runtime = os.environ.get("FINETUNE_RUNTIME", "auto")
    print(f"run {args.run}, image {image}, runtime {runtime}, {args.rounds} rounds")
    print(f"first predict (converting into an empty cache): {first:.2f} s")
    print(f"{'command':<36} {'median s':>9} {'min-max s':>13} {'/ through the model':>20}")
    for name, values in times.items():
        median = statistics.median(values)
        spread = f"{min(values):.2f}-{max(values):.2f}"
        print(f"{name:<36} {median:>9.2f} {spread:>13} {median / base:>19.2f}x")
    out = REPO / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"command_latency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {"run": str(args.run), "image": str(image), "runtime": runtime,
              "first_predict_s": first, "times_s": times}  # fmt: skip
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
