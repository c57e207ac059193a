"""One array of an .npz archive without reading it into memory.

``np.load(path)[key]`` reads a member whole, so preparing an .npz larger than memory failed.
Here a member stored uncompressed (``np.savez``) is memory-mapped where its bytes lie in the
archive; a compressed one (``np.savez_compressed``) larger than ``SPILL_BYTES`` is inflated once
into an unlinked file in ``spill_dir`` (beside the prepared output: disk, not memory, and
nothing left behind however the process ends) and memory-mapped there. Anything else - a small
compressed member, no ``spill_dir``, a header numpy's public readers do not parse - is read
as numpy reads it, with numpy's checks (no pickles).
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from fastvae.errors import FastVAEError

# a compressed member above this many bytes is inflated to disk rather than into memory
SPILL_BYTES = 256 << 20
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length


def member_array(npz, key: str, path: Path, spill_dir: Path | None = None,
                 progress: bool = True) -> np.ndarray:
    """``npz[key]`` (``npz`` the open ``np.lib.npyio.NpzFile`` of ``path``) as an array that
    holds no more than a memory map where it can (see the module docstring); ``progress``: the
    inflating bar (on a terminal)."""
    info = npz.zip.getinfo(_member_name(npz, key))
    with npz.zip.open(info) as member:
        try:
            header = _array_header(member)
            data_start = member.tell()
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            header = None  # numpy's own reading below says what is wrong, in its words
        if header is not None:
            size = int(np.prod(header[0])) * header[2].itemsize
            if data_start + size > info.file_size:  # truncated: the map would read what follows
                header = None
        if header is not None:
            if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
                try:
                    return _mapped(path, _data_offset(path, info) + data_start, *header)
                except (OSError, ValueError, zipfile.BadZipFile):
                    pass
            elif spill_dir is not None and info.file_size > SPILL_BYTES:
                return _spilled(member, header, spill_dir, path, key, progress)
    return npz[key]


def member_header(npz, key: str) -> tuple[tuple, bool, np.dtype] | None:
    """(shape, fortran order, dtype) of ``npz[key]`` from its header alone (no values read), or
    None where it cannot be read that way."""
    try:
        with npz.zip.open(_member_name(npz, key)) as member:
            return _array_header(member)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None


def _member_name(npz, key: str) -> str:
    """The archive's name for ``npz[key]`` (numpy adds ".npy" to the keys it writes)."""
    return key if key in npz.zip.namelist() else f"{key}.npy"


def _array_header(member) -> tuple[tuple, bool, np.dtype] | None:
    """(shape, fortran order, dtype) from a .npy header, or None where numpy's public readers
    do not cover it (format 3.0) or the array holds objects (pickles: numpy refuses them)."""
    version = np.lib.format.read_magic(member)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        return None
    shape, fortran, dtype = readers[version](member)
    return None if dtype.hasobject else (shape, fortran, dtype)


def _data_offset(archive: Path, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes begin: after its local header, whose extra field may differ from
    the central directory's (zip64 sizes)."""
    with open(archive, "rb") as f:
        f.seek(info.header_offset)
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local header for {info.filename}")
    return info.header_offset + _LOCAL_HEADER.size + name_length + extra_length


def _mapped(file, offset: int, shape: tuple, fortran: bool, dtype: np.dtype) -> np.ndarray:
    if int(np.prod(shape)) == 0:  # mmap cannot map nothing
        return np.empty(shape, dtype, order="F" if fortran else "C")
    return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _spilled(member, header: tuple, spill_dir: Path, path: Path, key: str, progress: bool) -> np.ndarray:
    """The rest of ``member`` (its data, after the header) inflated into an unlinked file in
    ``spill_dir`` and memory-mapped; a progress bar on a terminal. A damaged member is a
    FastVAEError here: numpy, reading it again, would hold all of it in memory to say so."""
    from fastvae.progress_bars import progress_bar

    shape, fortran, dtype = header
    size = int(np.prod(shape)) * dtype.itemsize
    what = f"{path.name}:{key}"
    if shutil.disk_usage(spill_dir).free < size:
        raise FastVAEError(_no_room(what, size, spill_dir, "not enough free space"))
    with tempfile.TemporaryFile(dir=spill_dir, prefix=".fastvae-npz-") as spill:  # unlinked at once
        bar = progress_bar(total=size, desc=f"inflating {what}", unit="B", unit_scale=True, leave=False,
                           mininterval=0.5, disable=None if progress else True)  # None: only on a terminal
        def read() -> bytes:  # memory: one chunk and zlib's window
            try:
                return member.read(1 << 20)
            except Exception as exc:  # noqa: BLE001 - zlib, CRC (BadZipFile), read errors alike
                raise FastVAEError(f"data file {path} is not a readable .npz archive: member {key!r}: "
                                   f"{type(exc).__name__}: {exc}") from None

        try:
            for chunk in iter(read, b""):
                spill.write(chunk)
                bar.update(len(chunk))
            spill.flush()
        except OSError as exc:  # the writes' (a read error is a FastVAEError already)
            raise FastVAEError(_no_room(what, size, spill_dir, exc.strerror or str(exc))) from None
        finally:
            bar.close()
        if spill.tell() < size:
            raise FastVAEError(f"data file {path} is not a readable .npz archive: member {key!r} holds "
                               f"{spill.tell()} of its {size} bytes")
        # the map keeps its own handle on the file: closing (and the unlinked name) frees the
        # disk space when the map goes
        return _mapped(spill, 0, shape, fortran, dtype)


def _no_room(what: str, size: int, spill_dir: Path, why: str) -> str:
    return (f"{what} is compressed: reading it a slice at a time needs it inflated once into "
            f"{spill_dir} ({size / 2**30:.2f} GiB), which failed: {why}. Free that much space there, "
            "or save the array uncompressed (numpy.save or numpy.savez), which is read in place")
