"""Writes that fail part-way (a full disk, a file-size limit): one line naming the file and
what to do, the previous file intact, no temporary file left, and nothing read past what was
saved. The failure comes from RLIMIT_FSIZE (``ulimit -f``): writes past the limit fail with
EFBIG, as past a full disk with ENOSPC, without a special file system or root."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
from pathlib import Path

import numpy as np
import pytest

from fastvae import run_folder
from fastvae.cli import _os_error, main
from testkit import assert_one_line_error

TINY = ("--data", "digits", "--hidden-dim", "64", "--latent-dim", "4", "--quiet", "--no-pictures",
        "--iwae-k", "0")


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Files of this process cannot grow past ``limit`` bytes (Python ignores SIGXFSZ, so the
    write fails with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_checkpoint_that_cannot_be_written_keeps_the_last_one(tmp_path, capsys):
    """The epoch-2 checkpoint fails: one line naming last.ckpt and the remedy, epoch 1's
    checkpoint intact, no half-written temporary file; the report and the loss curves describe
    the saved epoch (metrics.csv already has epoch 2's row, written before the checkpoint), and
    --resume continues once there is room."""
    from fastvae.checkpoint import read_checkpoint, trained_epochs
    from fastvae.report_page import write_report
    from fastvae.viz import save_loss_curves

    run = tmp_path / "run"
    assert cli(capsys, "train", *TINY, "--epochs", "1", "--out", run)[0] == 0
    first = (run / run_folder.LAST).read_bytes()
    with file_size_limit(len(first) // 2):
        rc, _, err = cli(capsys, "train", *TINY, "--epochs", "2", "--resume", "--out", run)
    assert_one_line_error(rc, err, f"cannot write {run / run_folder.LAST}: File too large", "ulimit -f")
    assert (run / run_folder.LAST).read_bytes() == first
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert [r["epoch"] for r in run_folder.read_metrics(run / run_folder.METRICS_CSV)] == [1, 2]

    assert trained_epochs(run) == 1
    curves = save_loss_curves(run / run_folder.METRICS_CSV, tmp_path / "curves.png", trained_epochs(run))
    assert curves is not None
    page = write_report(run, iwae_k=0).read_text()
    assert "1 epoch (24 steps)" in page and "2 epochs" not in page

    # a save cut by SIGKILL leaves its temporary file: the next save writes over it
    stale = run_folder.temporary_name(run / run_folder.LAST, tag="save")
    stale.write_bytes(b"half a checkpoint")
    rc, _, err = cli(capsys, "train", *TINY, "--epochs", "2", "--resume", "--out", run)
    assert rc == 0, err
    assert read_checkpoint(run)["epoch"] == 2 and not stale.exists()
    assert [r["epoch"] for r in run_folder.read_metrics(run / run_folder.METRICS_CSV)] == [1, 2]


def test_checkpoints_need_no_room_outside_the_run_folder(tmp_path, capsys, monkeypatch):
    """Fabric's own checkpoint writer staged the whole file in $TMPDIR first: a second disk
    that could be full (here: $TMPDIR takes no file), named in no error."""
    import tempfile

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "mkstemp", full)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", full)
    rc, _, err = cli(capsys, "train", *TINY, "--epochs", "1", "--out", tmp_path / "run")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last.ckpt"]


def test_a_failed_array_write_names_the_file_and_keeps_the_old_one(tmp_path, capsys):
    """numpy's own short write ("N requested and M written") has no errno and no file name."""
    path = tmp_path / "old.npy"
    run_folder.write_npy(path, np.zeros(10))
    with file_size_limit(4096), pytest.raises(OSError) as caught:
        run_folder.write_npy(path, np.ones(100_000))
    assert caught.value.filename == str(path) and caught.value.errno == errno.EFBIG
    np.testing.assert_array_equal(np.load(path), np.zeros(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.npy"]


@pytest.mark.parametrize("code, remedy", [
    (errno.ENOSPC, "the disk is full: free space"), (errno.EDQUOT, "quota"), (errno.EFBIG, "ulimit -f"),
    (errno.EIO, "check the device"), (errno.EROFS, "read-only"), (errno.EACCES, "permissions"),
])
def test_the_error_line_says_what_to_do(code, remedy, tmp_path):
    staged = run_folder.temporary_name(tmp_path / "x.onnx")
    line = _os_error(OSError(code, os.strerror(code), str(tmp_path / "run" / "config.json")))
    assert f"{tmp_path / 'run' / 'config.json'}: {os.strerror(code)}; " in line and remedy in line
    # a file inside a staging folder is named by the folder it was to be written into
    inside = _os_error(OSError(code, os.strerror(code), str(staged / "x.onnx")))
    assert inside.startswith(f"cannot write into {tmp_path}: ") and remedy in inside
    # a failed write() names no file: what went wrong and, where known, what to do
    assert _os_error(OSError(code, os.strerror(code))).startswith(os.strerror(code))


def test_a_file_where_a_folder_goes_and_back_is_named(tmp_path):
    """mkdir under a file said "cannot use afile: File exists"; a rename onto a folder named
    the staging folder's parent ("cannot write into .: Is a directory")."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "out.npy").mkdir()
    for make, expected in (
            (lambda: (tmp_path / "afile" / "sub").mkdir(parents=True),
             f"cannot use {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a folder"),
            (lambda: (tmp_path / "afile").mkdir(), f"cannot use {tmp_path / 'afile'} as a folder: it is a file"),
            (lambda: run_folder.write_npy(tmp_path / "out.npy", np.zeros(3)),
             f"cannot write {tmp_path / 'out.npy'}: it is a folder; give a file name")):
        with pytest.raises(OSError) as caught:
            make()
        assert _os_error(caught.value).startswith(expected), _os_error(caught.value)


def test_the_error_line_never_fails_itself_where_it_cannot_look(tmp_path, monkeypatch):
    """Path.is_file re-raises EACCES (a folder this user may not search): the one-line error
    for a failed mkdir became a PermissionError traceback."""
    from pathlib import Path

    def no_access(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_file", no_access)
    monkeypatch.setattr(Path, "is_dir", no_access)
    for code in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EACCES):
        line = _os_error(OSError(code, os.strerror(code), str(tmp_path / "locked" / "run")))
        assert line.startswith(f"cannot use {tmp_path / 'locked' / 'run'}: {os.strerror(code)}"), line


def test_a_decode_that_fails_part_way_leaves_the_earlier_images_whole(tmp_path, monkeypatch):
    """decode --overwrite replaced the numbered PNGs one by one: a full disk after 11 of 20
    left 11 new images among 9 old ones, silently."""
    from PIL import Image

    from fastvae.commands.decode_command import _write

    out = tmp_path / "images"
    old = _write(np.zeros((5, 1, 4, 4), np.float32), out)
    before = {p.name: p.read_bytes() for p in old}
    save, calls = Image.Image.save, []

    def third_fails(image, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", third_fails)
    with pytest.raises(OSError, match="No space left"):
        _write(np.ones((5, 1, 4, 4), np.float32), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no staging folder left
    monkeypatch.setattr(Image.Image, "save", save)
    new = _write(np.ones((5, 1, 4, 4), np.float32), out)
    assert all(np.asarray(Image.open(p)).min() == 255 for p in new)


def test_decode_swaps_a_folder_of_images_but_not_the_current_folder(tmp_path, monkeypatch):
    """The staged folder replaces --out by renames where that surprises no one; in the current
    folder (a shell would be left in a deleted one) the images are renamed in one by one."""
    from PIL import Image

    from fastvae.commands.decode_command import _write

    out = tmp_path / "images"
    _write(np.zeros((3, 1, 4, 4), np.float32), out)
    first = out.stat().st_ino
    _write(np.ones((3, 1, 4, 4), np.float32), out)
    assert out.stat().st_ino != first  # swapped
    monkeypatch.chdir(out)
    second = out.stat().st_ino
    _write(np.zeros((3, 1, 4, 4), np.float32), out)
    assert out.stat().st_ino == second and Path.cwd().exists()
    assert [np.asarray(Image.open(p)).max() for p in sorted(out.glob("*.png"))] == [0, 0, 0]
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "0002.png"]  # no staging left
    # a file arriving in the folder while the images are decoded stays
    monkeypatch.chdir(tmp_path)
    real_save = Image.Image.save

    def save_and_add(image, fp, *args, **kwargs):
        (out / "notes.txt").write_text("mine")
        return real_save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_and_add)
    _write(np.ones((3, 1, 4, 4), np.float32), out)
    assert (out / "notes.txt").read_text() == "mine"
    assert [np.asarray(Image.open(p)).max() for p in sorted(out.glob("*.png"))] == [255, 255, 255]


@pytest.mark.parametrize("kill_before_rename", [1, 2, 3])
def test_a_decode_killed_among_its_renames_leaves_one_whole_set(tmp_path, kill_before_rename, capsys):
    """decode --overwrite renamed the new PNGs in one by one: a SIGKILL between two renames
    left new images among old ones. Killed before any rename of the swap, the folder (or, after
    the first, the old set put aside) holds one whole set."""
    import signal
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "images"
    script = f"""
import os, signal
from pathlib import Path
import numpy as np
from fastvae.commands.decode_command import _write
out = Path({str(out)!r})
_write(np.zeros((5, 1, 4, 4), np.float32), out)
real, calls = os.replace, []
def replace(src, dst):
    calls.append(src)
    if len(calls) == {kill_before_rename}:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
_write(np.ones((3, 1, 4, 4), np.float32), out)
"""
    rc = subprocess.run([sys.executable, "-c", script], timeout=120).returncode
    sets = {}
    for folder in [out, *tmp_path.glob(".images.old-*")]:
        if folder.is_dir():
            pixels = {p.name: int(np.asarray(Image.open(p)).max()) for p in folder.glob("*.png")}
            sets[folder.name] = (len(pixels), tuple(sorted(set(pixels.values()))))
    if rc == -signal.SIGKILL:  # killed: the old set whole, in place or put aside, and nothing mixed
        assert (5, (0,)) in sets.values() and set(sets.values()) <= {(5, (0,)), (3, (255,))}
        from fastvae.commands.decode_command import _report_leftovers

        _report_leftovers(out)  # what the next decode into the folder says
        notes = capsys.readouterr().err.splitlines()
        aside = sorted(tmp_path.glob(".images.old-*"))
        assert [n.split(" ")[1] for n in notes if "earlier images" in n] == [str(p) for p in aside]
        assert len(notes) == len(aside) + len(list(tmp_path.glob(".images.tmp-*")))
    else:  # the swap needs two renames: the third was never reached
        assert rc == 0 and sets == {"images": (3, (255,))}


def test_an_int8_quantization_that_fails_is_one_line(tmp_path, monkeypatch):
    """onnx's shape inference truncates its copy of the model on a full disk, silently; the
    quantizer then failed to parse it with a traceback (DecodeError, ValueError)."""
    import shutil
    from collections import namedtuple

    import onnxruntime.quantization as ortq

    from fastvae.errors import FastVAEError
    from fastvae.export import quantize

    import onnx
    from onnx import TensorProto, helper

    src = tmp_path / "d.onnx"  # a graph for the size check; the quantizer itself is replaced
    value = helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 4])
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["z"], ["x"])], "g", [value],
                                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])])), src)

    def truncated(*args, **kwargs):
        raise ValueError("Failed to find proper ai.onnx domain")

    monkeypatch.setattr(ortq, "quantize_dynamic", truncated)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(OSError) as caught:
        quantize.to_int8(src, tmp_path / "d.int8.onnx")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "d.int8.onnx")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    with pytest.raises(FastVAEError, match="int8 quantization failed .*ai.onnx domain.*export without --int8"):
        quantize.to_int8(src, tmp_path / "d.int8.onnx")

    def tmpdir_full(*args, **kwargs):  # onnxruntime's own copy of the model, in $TMPDIR
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmpdir / "ort.quant.x" / "model.onnx"))

    tmpdir = tmp_path / "tmpdir"
    monkeypatch.setattr("tempfile.tempdir", str(tmpdir))
    tmpdir.mkdir()
    monkeypatch.setattr(ortq, "quantize_dynamic", tmpdir_full)
    with pytest.raises(FastVAEError, match=rf"copy of the model to {tmpdir} \(\$TMPDIR\), which has no room"):
        quantize.to_int8(src, tmp_path / "d.int8.onnx")
