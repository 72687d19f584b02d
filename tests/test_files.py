"""lit_wuerstchen.files: a failed write leaves the previous file or folder whole and no temporary behind."""

from __future__ import annotations

import numpy as np
import pytest

from lit_wuerstchen.files import atomic_file, replaced_folder, write_text_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "stats.npz"
    with atomic_file(path) as partial:
        np.savez(partial, x=np.arange(3))  # np.savez appends .npz unless the name ends with it
    assert np.load(path)["x"].tolist() == [0, 1, 2]
    with pytest.raises(RuntimeError, match="interrupted"), atomic_file(path) as partial:
        partial.write_bytes(b"half a file")
        raise RuntimeError("interrupted")
    assert np.load(path)["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]
    write_text_atomic(tmp_path / "deeper" / "note.txt", "done\n")
    assert (tmp_path / "deeper" / "note.txt").read_text() == "done\n"


def test_a_failed_folder_write_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "export"
    with replaced_folder(folder) as partial:
        (partial / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), replaced_folder(folder) as partial:
        (partial / "a.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert (folder / "a.txt").read_text() == "old"
    with replaced_folder(folder) as partial:
        (partial / "b.txt").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["b.txt"]  # nothing stale survives a replacement
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
