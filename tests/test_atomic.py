"""ddpm.atomic: a file is replaced whole or not at all; a failed write leaves the previous bytes and no partial file."""
from __future__ import annotations

from pathlib import Path

import pytest

from ddpm.atomic import partial_path, write_atomic, write_text_atomic


def test_write_replaces_the_file_and_leaves_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "run.json"
    write_text_atomic(target, "first")
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["run.json"]


def test_a_failing_writer_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "samples.npz"
    target.write_bytes(b"old bytes")

    def half_then_fail(f) -> None:
        f.write(b"half of the new")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"old bytes"
    assert not partial_path(target).exists()
