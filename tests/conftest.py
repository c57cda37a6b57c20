"""Test-wide settings: no network, and caches kept out of the user's home."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(autouse=True, scope="session")
def _offline_and_private_caches(tmp_path_factory):
    cache = tmp_path_factory.mktemp("finetune_cache")
    keras_home = tmp_path_factory.mktemp("keras_home")
    names = ("FINETUNE_OFFLINE", "FINETUNE_CACHE_DIR", "KERAS_HOME", "FINETUNE_RUNTIME")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.pop("FINETUNE_RUNTIME", None)  # tests choose the runtime themselves
    os.environ["FINETUNE_OFFLINE"] = "1"
    os.environ["FINETUNE_CACHE_DIR"] = str(cache)
    os.environ["KERAS_HOME"] = str(keras_home)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
