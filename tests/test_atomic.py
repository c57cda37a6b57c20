"""Atomic writes: an error mid-write leaves the previous file whole and no temporary file."""

from __future__ import annotations

import json

import pytest

from finetune.atomic import atomic_write, write_json


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"accuracy": 0.9})
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write('{"accuracy": 0.')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"accuracy": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_binary_writes_and_new_folders(tmp_path):
    target = tmp_path / "new" / "blob.bin"
    with atomic_write(target, "wb") as handle:
        handle.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert oct(target.stat().st_mode & 0o777) == "0o644"
