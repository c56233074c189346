"""Read and write ``torch.save`` files without torch; tensors are (memory-mapped) numpy arrays.

A ``.pt`` file written by ``torch.save`` (torch >= 1.6) is an uncompressed zip archive
(spec/jax-stack.md section 9)::

    <name>/data.pkl        a pickle; each tensor is a call of torch._utils._rebuild_tensor_v2(
                           storage, offset, size, stride, requires_grad, hooks[, metadata]), each
                           storage a persistent id ('storage', torch.<Type>Storage, key, location,
                           numel)
    <name>/data/<key>      the raw bytes of storage <key>, little-endian (64-byte aligned since
                           torch 2.x, so numpy can map them in place)
    <name>/byteorder       "little" (absent in old files, which were little-endian too)
    <name>/version

:func:`load` runs that pickle with an unpickler that resolves a short allow-list of globals: the
tensor and storage rebuilders (to numpy arrays; bfloat16 through ml_dtypes), plain containers,
``argparse.Namespace`` and numpy's own array pickling. Everything else is refused with an error
naming the file and the global, except that ``foreign="record"`` turns classes of Megatron and
DeepSpeed (the enums in Megatron's ``args``, DeepSpeed's loss scaler and fragment records) into
inert :class:`PickledObject` records. No pickled code ever runs and torch is never imported.

:func:`save` writes the same archive from numpy arrays, plain containers, ``argparse.Namespace``
and :class:`TorchSize`, with the records torch.save writes (data/ storages 64-byte aligned), so
``torch.load`` (``weights_only=True`` included) reads it as if torch had written it.

Over 400 lines on purpose: one file format, torch's zip + pickle archive, read and written without
torch (the restricted unpickler, storages, the writer); its halves share the record types.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import math
import mmap
import os
import pickle
import struct
import zipfile
from typing import Any, Literal

import ml_dtypes
import numpy as np


class PtArchiveError(ValueError):
    """A ``.pt`` file cannot be read: truncated, not a torch.save archive, or a refused global."""


# torch's storage classes (the legacy names torch.save still writes) and dtypes -> numpy dtypes.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64), "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32), "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16), "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64), "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}

#: Module prefixes whose classes ``foreign="record"`` keeps as inert records.
RECORDED_MODULES: tuple[str, ...] = ("megatron", "deepspeed")


@dataclasses.dataclass(frozen=True)
class TorchDtype:
    """A ``torch.<dtype>`` value found in a pickle (e.g. Megatron's ``args.params_dtype``)."""

    name: str

    @property
    def numpy(self) -> np.dtype:
        return _TORCH_DTYPES[self.name]

    def __str__(self) -> str:
        return f"torch.{self.name}"


class PickledObject:
    """An inert stand-in for a Megatron or DeepSpeed object in a pickle.

    Attributes:
        pickled_class: ``"module.QualName"`` of the original class or callable.
        args: arguments the pickle would have called it with (REDUCE / NEWOBJ).
        state: the state the pickle would have set (BUILD), usually the object's ``__dict__``.
    """

    pickled_class = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        obj = object.__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"PickledObject({self.pickled_class}, args={self.args!r}, state={self.state!r})"


_STANDINS: dict[str, type] = {}


def _standin(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _STANDINS:
        _STANDINS[key] = type(name, (PickledObject,), {"pickled_class": key,
                                                       "__module__": __name__})
    return _STANDINS[key]


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *_ignored: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: a (strided) view of the storage's elements."""
    size, stride = tuple(size), tuple(stride)
    count = math.prod(size)
    if count == 0:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= storage.size or min(stride, default=0) < 0:
        raise PtArchiveError(f"tensor of size {list(size)}, stride {list(stride)} at offset "
                             f"{offset} does not fit its storage of {storage.size} elements")
    base = storage[offset:]
    return np.lib.stride_tricks.as_strided(
        base, shape=size, strides=tuple(s * storage.itemsize for s in stride), writeable=False)


def _rebuild_parameter(data: np.ndarray, *_ignored: Any) -> np.ndarray:
    return data


def _numpy_multiarray() -> Any:
    """numpy's multiarray module, where its array pickles point (``numpy._core`` from 2.0)."""
    import importlib

    return importlib.import_module("numpy.core.multiarray" if np.__version__.startswith("1.")
                                   else "numpy._core.multiarray")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import _codecs

    multiarray = _numpy_multiarray()
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("argparse", "Namespace"): argparse.Namespace,
        ("_codecs", "encode"): _codecs.encode,  # bytes of numpy arrays under protocol 2
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch", "Size"): tuple,
        ("torch", "device"): str,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for name in ("set", "frozenset", "complex", "slice", "range", "bytearray", "tuple", "list",
                 "dict", "int", "float", "str", "bool", "bytes"):
        allowed[("builtins", name)] = getattr(__import__("builtins"), name)
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(dtype)
    for name in _TORCH_DTYPES:
        allowed[("torch", name)] = TorchDtype(name)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    for attr in dir(np.dtypes):
        if attr.endswith("DType"):
            allowed[("numpy.dtypes", attr)] = getattr(np.dtypes, attr)
    return allowed


_ALLOWED: dict[tuple[str, str], Any] | None = None


def _member_offset(raw: mmap.mmap, info: zipfile.ZipInfo, path: str) -> int:
    """Where an uncompressed member's bytes start: after its local header (not the central one)."""
    header = raw[info.header_offset:info.header_offset + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise PtArchiveError(f"{path}: the zip entry {info.filename} has no local header; the "
                             "file is damaged: copy it again")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: _Archive, foreign: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._foreign = foreign

    def find_class(self, module: str, name: str) -> Any:
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed_globals()
        if module == "__builtin__":  # protocol 2 names builtins so (fix_imports): a set, e.g.
            module = "builtins"      # DeepSpeed's sparse_tensor_module_names
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if self._foreign == "record" and module.split(".")[0] in RECORDED_MODULES:
            return _standin(module, name)
        raise PtArchiveError(
            f"{self._archive.path}: pickles the global {module}.{name}, which agpt-jax does not "
            "load (it only rebuilds tensors, containers and Megatron/DeepSpeed records, and runs "
            "no pickled code); re-save the file with plain tensors and containers")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise PtArchiveError(f"{self._archive.path}: unknown persistent id {pid!r} in "
                                 "data.pkl (not a torch.save storage)")
        _, kind, key, _location, numel = pid
        if isinstance(kind, TorchDtype):
            kind = _StorageType(kind.numpy)
        if not isinstance(kind, _StorageType):
            raise PtArchiveError(f"{self._archive.path}: storage {key} has type {kind!r}, "
                                 "not a torch storage class")
        return self._archive.storage(str(key), kind.dtype, int(numel))


class _Archive:
    """An open torch.save zip archive: the pickle and its storages, memory-mapped."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._file = open(path, "rb")
        except OSError as err:
            raise PtArchiveError(f"{path}: cannot be opened ({err.strerror})") from None
        try:
            self._zip = zipfile.ZipFile(self._file)
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            self._file.seek(0)
            head = self._file.read(2)
            self._file.close()
            if head[:1] == b"\x80":
                raise PtArchiveError(
                    f"{path}: written in torch's pre-1.6 legacy format, which agpt-jax does not "
                    "read; load and save it once with a current torch") from None
            raise PtArchiveError(f"{path}: not a torch.save zip archive ({err}); the file is "
                                 "truncated or damaged: copy it again") from None
        names = self._zip.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            self.close()
            raise PtArchiveError(f"{path}: a zip archive without exactly one data.pkl (found "
                                 f"{len(pickles)}); not a torch.save file")
        self.prefix = pickles[0][: -len("data.pkl")]
        self._infos = {i.filename: i for i in self._zip.infolist()}
        order = self._infos.get(self.prefix + "byteorder")
        if order is not None and self._zip.read(order).decode().strip() != "little":
            self.close()
            raise PtArchiveError(f"{path}: big-endian storages; agpt-jax reads little-endian "
                                 "files only (re-save on a little-endian machine)")
        size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def pickle_bytes(self) -> bytes:
        return self._zip.read(self.prefix + "data.pkl")

    def storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        info = self._infos.get(f"{self.prefix}data/{key}")
        if info is None:
            raise PtArchiveError(f"{self.path}: storage {key} is named in data.pkl but missing "
                                 "from the archive; the file is damaged: copy it again")
        nbytes = numel * dtype.itemsize
        if info.file_size < nbytes:
            raise PtArchiveError(f"{self.path}: storage {key} holds {info.file_size} bytes, "
                                 f"{nbytes} expected; the file is damaged: copy it again")
        if info.compress_type == zipfile.ZIP_STORED and self._map is not None:
            start = _member_offset(self._map, info, self.path)
            if start + nbytes > len(self._map):
                raise PtArchiveError(f"{self.path}: storage {key} runs past the end of the file; "
                                     "the file is truncated: copy it again")
            return np.frombuffer(self._map, dtype=dtype, count=numel, offset=start)
        data = self._zip.read(info)  # compressed by a tool other than torch.save: a copy
        return np.frombuffer(data, dtype=dtype, count=numel)

    def close(self) -> None:
        # The memory map stays valid while arrays view it; closing the file does not unmap it.
        self._zip.close()
        self._file.close()


def release_pages(array: np.ndarray) -> None:
    """Drop this process's resident pages of the memory map behind `array` (a tensor `load`
    returned, or a view of one), so they stop counting in its RSS. The arrays stay valid: a later
    read faults the pages in again from the file (the map is read-only and file-backed). No-op for
    arrays that are not memory-mapped."""
    base: Any = array
    for _ in range(64):  # views of views; as_strided puts a DummyArray (.base) in the chain
        if isinstance(base, memoryview):
            base = base.obj
        elif getattr(base, "base", None) is not None:
            base = base.base
        else:
            break
    if isinstance(base, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


def load(path: str, *, foreign: Literal["refuse", "record"] = "refuse") -> Any:
    """Loads a ``torch.save`` file as numpy arrays and plain Python data, without torch.

    Args:
        path: the ``.pt`` file.
        foreign: ``"refuse"`` (tensor files: any global beyond tensors and containers is an
            error) or ``"record"`` (Megatron's model states and DeepSpeed's optimizer states:
            classes of the ``megatron`` and ``deepspeed`` packages become inert
            :class:`PickledObject` records; anything else is still refused).

    Returns:
        The unpickled object; tensors are read-only numpy arrays mapping the file where it is
        stored uncompressed (copy them to modify), ``torch.<dtype>`` values are
        :class:`TorchDtype`, ``argparse.Namespace`` stays one.

    Raises:
        PtArchiveError: with the file and what is wrong with it.
    """
    archive = _Archive(path)
    try:
        return _ArchiveUnpickler(archive.pickle_bytes(), archive, foreign).load()
    except PtArchiveError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
            KeyError, IndexError, AttributeError, struct.error, OSError) as err:
        raise PtArchiveError(f"{path}: data.pkl cannot be read ({type(err).__name__}: {err}); "
                             "the file is truncated or damaged: copy it again") from None
    finally:
        archive.close()


# ----------------------------------------------------------------------------------------------
# Writing.


class TorchSize(tuple):
    """A tuple that :func:`save` writes as ``torch.Size`` (DeepSpeed's ``param_shapes``)."""


_NUMPY_TO_STORAGE: dict[np.dtype, str] = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}
_ALIGNMENT = 64  # torch.save aligns storage records to 64 bytes (its .storage_alignment record)


@dataclasses.dataclass(frozen=True)
class _Global:
    """A global written by name (GLOBAL opcode) without importing its module."""

    module: str
    name: str

    def __call__(self, *args: Any) -> Any:  # pickle requires a callable; it is never called
        raise TypeError(f"{self.module}.{self.name} is only written by name")


_REBUILD_TENSOR = _Global("torch._utils", "_rebuild_tensor_v2")
_TORCH_SIZE = _Global("torch", "Size")


class _Storage:
    def __init__(self, key: str, array: np.ndarray) -> None:
        self.key, self.array = key, array


class _ArchivePickler(pickle._Pickler):  # the Python pickler: it lets save_global be replaced
    """Pickles like torch.save: arrays as tensors over persistent storages, torch globals by name."""

    def __init__(self, file: io.BytesIO, path: str) -> None:
        super().__init__(file, protocol=2)
        self.path = path
        self.storages: list[_Storage] = []

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            dtype = obj.dtype.newbyteorder("<") if obj.dtype.byteorder == ">" else obj.dtype
            if dtype not in _NUMPY_TO_STORAGE:
                raise PtArchiveError(f"{self.path}: cannot store an array of dtype {obj.dtype} "
                                     "as a torch tensor")
            data = np.asarray(obj, dtype=dtype, order="C")  # keeps 0-d arrays 0-d
            storage = _Storage(str(len(self.storages)), data)
            self.storages.append(storage)
            stride = tuple(int(np.prod(data.shape[i + 1:])) for i in range(data.ndim))
            return (_REBUILD_TENSOR, (storage, 0, tuple(data.shape), stride, False,
                                      collections.OrderedDict()))
        if isinstance(obj, TorchSize):
            return (_TORCH_SIZE, (tuple(obj),))
        if isinstance(obj, np.generic):
            raise PtArchiveError(f"{self.path}: numpy scalar {obj!r}: pass a Python number, or a "
                                 "0-d array for a tensor")
        return NotImplemented

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            kind = _Global("torch", _NUMPY_TO_STORAGE[obj.array.dtype])
            return ("storage", kind, obj.key, "cpu", int(obj.array.size))
        return None

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, _Global):
            # A _Global is not a class or function, so pickle would reduce it: write it by name.
            memo = self.memo.get(id(obj))
            if memo is not None:
                self.write(self.get(memo[0]))
                return
            self.save_global(obj)
            return
        super().save(obj, save_persistent_id)


def _aligned_member(zf: zipfile.ZipFile, name: str, data: bytes | memoryview) -> None:
    """Writes one stored member whose bytes start on a 64-byte boundary, as torch.save does.

    The data is streamed from ``data`` (no copy of a large tensor); members over 2 GiB get
    zip64 records, which zipfile adds to the local header and the padding accounts for.
    """
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    size = len(data) if isinstance(data, bytes) else data.nbytes
    zip64 = size > zipfile.ZIP64_LIMIT
    start = zf.fp.tell() + 30 + len(name.encode()) + (20 if zip64 else 0)
    pad = (-(start + 4)) % _ALIGNMENT
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # the "FB" padding field
    info.file_size = size
    with zf.open(info, "w", force_zip64=zip64) as out:
        view = memoryview(data).cast("B")
        for begin in range(0, size, 1 << 26):
            out.write(view[begin:begin + (1 << 26)])


def save(obj: Any, path: str) -> None:
    """Writes ``obj`` as a torch.save zip archive (torch >= 1.6 format) without torch.

    Args:
        obj: nested dicts / OrderedDicts / lists / tuples of numpy arrays (written as tensors of
            the same dtype; bfloat16 through ml_dtypes), :class:`TorchSize`, numbers, strings,
            None and ``argparse.Namespace``.
        path: the file to write (replaced if present).

    Raises:
        PtArchiveError: an array dtype torch has no storage for.
        OSError: the file cannot be written (disk full, permissions).
    """
    buffer = io.BytesIO()
    pickler = _ArchivePickler(buffer, path)
    pickler.dump(obj)
    prefix = os.path.splitext(os.path.basename(path))[0] or "archive"
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        _aligned_member(zf, f"{prefix}/data.pkl", buffer.getvalue())
        _aligned_member(zf, f"{prefix}/.format_version", b"1")
        _aligned_member(zf, f"{prefix}/.storage_alignment", str(_ALIGNMENT).encode())
        _aligned_member(zf, f"{prefix}/byteorder", b"little")
        for storage in pickler.storages:
            _aligned_member(zf, f"{prefix}/data/{storage.key}",
                            memoryview(storage.array.reshape(-1).view(np.uint8)))
        _aligned_member(zf, f"{prefix}/version", b"3")
