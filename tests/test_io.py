"""Atomic writers (fcflow.io): a file appears complete or not at all, with stable bytes."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fcflow import io


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "map.nii.gz"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_file(tmp_path):
    target = io.write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("new, half")
            raise RuntimeError
    assert target.read_text() == "old"


def test_temporary_name_keeps_the_compound_suffix(tmp_path):
    with io.atomic_path(tmp_path / "x_bold.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.name.startswith(".x_bold.tmp-")
        tmp.write_bytes(b"")


def test_nifti_bytes_are_identical_across_writes(tmp_path):
    data = np.random.default_rng(0).standard_normal((7, 8, 9)).astype(np.float32)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    first = io.save_img(img, tmp_path / "a.nii.gz").read_bytes()
    second = io.save_img(img, tmp_path / "b.nii.gz").read_bytes()
    assert first == second
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "a.nii.gz").dataobj), data)


def test_json_tsv_and_checksum(tmp_path):
    path = io.write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    assert path.read_text().index('"a"') < path.read_text().index('"b"')
    table = pd.DataFrame({"participant_id": ["sub-01"], "age": [np.nan]})
    tsv = io.write_tsv(tmp_path / "p.tsv", table)
    assert tsv.read_text() == "participant_id\tage\nsub-01\tn/a\n"
    assert io.sha256_file(tsv) == hashlib.sha256(tsv.read_bytes()).hexdigest()


def test_participant_qc_table_is_updated_per_run_never_truncated(tmp_path):
    # issue 17: rerunning one run rewrote the table with one row; the group level then lacked the
    # others' mean FD
    import pandas as pd

    from fcflow.derivatives import write_participant_qc

    def row(session, task, fd, reason=""):
        return {"participant_id": "sub-01", "session": session, "task": task, "run": None, "mean_fd_mm": fd,
                "excluded": bool(reason), "exclusion_reason": reason}

    path = write_participant_qc(tmp_path, "01", [row("baseline", "rest", 0.1), row("infusion", "rest", 0.2),
                                                 row("infusion", "nback", 0.3, "too few volumes")])
    before = path.read_text()
    write_participant_qc(tmp_path, "01", [row("infusion", "rest", 0.25)])
    table = pd.read_csv(path, sep="\t", keep_default_na=False)
    assert list(zip(table["session"], table["task"])) == [("baseline", "rest"), ("infusion", "nback"),
                                                          ("infusion", "rest")]
    assert table.set_index(["session", "task"]).loc[("infusion", "rest"), "mean_fd_mm"] == 0.25
    assert table.set_index(["session", "task"]).loc[("infusion", "nback"), "exclusion_reason"] == "too few volumes"
    # the same runs again give the same bytes
    write_participant_qc(tmp_path, "01", [row("baseline", "rest", 0.1), row("infusion", "rest", 0.2),
                                          row("infusion", "nback", 0.3, "too few volumes")])
    assert path.read_text() == before


def test_disk_full_is_one_error_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    # issue 17: a full disk surfaced as a traceback inside nipype's report copy
    import errno
    import pathlib

    import pytest

    from fcflow.errors import FcflowError, OutputError
    from fcflow.io import write_json, write_text

    write_text(tmp_path / "kept.txt", "before")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    with pytest.raises(OutputError, match=r"Cannot write .*kept\.txt: No space left on device\. Free space") as info:
        write_text(tmp_path / "kept.txt", "after")
    assert isinstance(info.value, FcflowError) and info.value.errno == errno.ENOSPC
    with pytest.raises(OutputError, match=r"new\.json"):
        write_json(tmp_path / "new.json", {"a": 1})
    monkeypatch.undo()
    assert (tmp_path / "kept.txt").read_text() == "before"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]  # no temporary file left


def test_writing_under_a_file_is_one_error(tmp_path):
    import pytest

    from fcflow.errors import OutputError
    from fcflow.io import write_text

    (tmp_path / "out").write_text("a file")
    with pytest.raises(OutputError, match=r"Cannot write .*out/sub-01/x\.txt: .*not a folder"):
        write_text(tmp_path / "out" / "sub-01" / "x.txt", "x")
