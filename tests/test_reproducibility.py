"""Same seed, same run; and the run directory says how to make it again (`manifest.json`).

One run through the command line in a fresh process, one through the Python API in this one
(after whatever other tests ran here): the same weights bit for bit, the same history and test
metrics. Each run's manifest records the command line (or the Python call and its options),
seed, backend, package versions, data fingerprint and every file with its split, label and
BLAKE2b hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib.metadata import version

import numpy as np
import pytest

import finetune
from finetune.data.split import read_split
from tests.helpers import DIGITS, image_subset

SIZE = 32
OPTIONS = {"image_size": SIZE, "head_epochs": 1, "finetune_epochs": 1, "seed": 7}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return image_subset(DIGITS, tmp_path_factory.mktemp("digits"), classes=3, per_class=20)


@pytest.mark.slow
def test_the_same_seed_in_another_process_gives_the_same_run_and_the_manifest_says_how(
    digits, tmp_path
):
    api_dir, cli_dir = tmp_path / "api", tmp_path / "cli"
    api = finetune.train(digits, out=api_dir, progress=False, check_data=False, **OPTIONS)
    argv = [
        sys.executable, "-m", "finetune", "train", str(digits), "--out", str(cli_dir),
        "--image-size", str(SIZE), "--head-epochs", "1", "--finetune-epochs", "1",
        "--seed", "7", "--no-check-data",
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cli = finetune.Run.load(cli_dir)

    for a, b in zip(api.model.get_weights(), cli.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert cli.history == api.history
    assert cli.metrics["confusion_matrix"] == api.metrics["confusion_matrix"]
    assert cli.metrics["loss"] == api.metrics["loss"]

    manifests = [json.loads((d / "manifest.json").read_text()) for d in (api_dir, cli_dir)]
    api_manifest, cli_manifest = manifests
    # The command line as typed (argv), or the Python call with its options.
    assert cli_manifest["command"]["argv"][1:] == argv[3:]
    assert api_manifest["command"]["python"] == "finetune.train"
    assert api_manifest["command"]["arguments"] | OPTIONS == api_manifest["command"]["arguments"]
    assert api_manifest["command"]["arguments"]["data_dir"] == str(digits)
    for m in manifests:
        assert (m["seed"], m["deterministic"], m["keras_backend"]) == (7, True, "tensorflow")
        assert m["packages"]["keras"] == version("keras")
        assert m["packages"]["numpy"] == version("numpy")
        assert m["data_fingerprint"] == api.info["data_fingerprint"]
    assert api_manifest["files"] == cli_manifest["files"]

    # Every file of every split, with its label and the hash of its bytes.
    split = read_split(api_dir / "split.json")
    expected = sorted(
        (name, s.path.relative_to(digits).as_posix(), api.class_names[s.label])
        for name, samples in split.splits.items()
        for s in samples
    )
    files = api_manifest["files"]
    assert sorted((f["split"], f["path"], f["label"]) for f in files) == expected
    assert len(files) == 60
    for f in files:
        content = (digits / f["path"]).read_bytes()
        assert f["blake2b_128"] == hashlib.blake2b(content, digest_size=16).hexdigest()
