"""The teacher cache in pure Python (numpy; torch optional): read and write
the directories of ``kdfuse teacher-cache build`` (docs/DESIGN.md §10).

A cache is ``teacher_cache.index.json`` plus ``shard-00000.safetensors``, …;
each shard holds ``indices`` (I32 [rows, k]), ``values`` (BF16 or F32
[rows, k]) and optionally ``lse`` (F32 [rows]). The safetensors files are
read by parsing their header (8 bytes of little-endian length, then JSON)
and viewing the bytes with ``numpy.frombuffer``: no other package.

    cache = TeacherCache("cache")
    for indices, values in cache.batches(4096):
        ...                       # numpy int32 / float32 [rows, k]
    indices, values, lse = cache.read_rows(0, 128, torch=True)

    with TeacherCacheWriter("cache", k=64, vocab_size=32000) as w:
        w.push(indices, values)   # [rows, k] each; whole shards published atomically
"""

import json
import os
import struct
import tempfile

import numpy as np

__all__ = ["TeacherCache", "TeacherCacheWriter", "TeacherCacheError", "read_safetensors"]

FORMAT = "kdfuse-teacher-cache"
VERSION = 1
INDEX_FILE = "teacher_cache.index.json"
_MAX_HEADER = 100_000_000
_DTYPES = {"I32": ("<i4", 4), "F32": ("<f4", 4), "BF16": ("<u2", 2)}


class TeacherCacheError(ValueError):
    """A cache that cannot be read or written; the message names the file."""


def shard_file(i):
    """The file name of shard ``i``: ``shard-00000.safetensors``, …"""
    return f"shard-{i:05d}.safetensors"


def _bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x):
    """Round to nearest even, as the Rust writer (half::bf16::from_f32)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = np.isnan(x)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(nan, ((u >> 16) | np.uint32(0x40)).astype(np.uint16), rounded)


def read_safetensors(path):
    """A safetensors file's header and data: (tensors, metadata, data), where
    ``tensors`` maps a name to (dtype, shape, (begin, end)) and ``data`` is
    the bytes after the header."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise TeacherCacheError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > min(_MAX_HEADER, len(raw) - 8):
        raise TeacherCacheError(f"{path}: header length {n} exceeds the file")
    try:
        header = json.loads(raw[8 : 8 + n])
    except ValueError as e:
        raise TeacherCacheError(f"{path}: not a safetensors header: {e}") from None
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(raw)[8 + n :]
    tensors = {}
    end = 0
    for name, t in header.items():
        b, e = t["data_offsets"]
        tensors[name] = (t["dtype"], list(t["shape"]), (b, e))
        end = max(end, e)
    if end != len(data):
        raise TeacherCacheError(
            f"{path}: {len(raw)} bytes, the header describes {8 + n + end} "
            "(a truncated or altered shard)"
        )
    return tensors, metadata, data


def _meta_header(meta):
    return {
        "format": FORMAT,
        "format_version": str(VERSION),
        "k": str(meta["k"]),
        "vocab_size": str(meta["vocab_size"]),
        "temperature": "none" if meta["temperature"] is None else repr(float(meta["temperature"])),
        "teacher": meta["teacher"],
        "values_kind": meta["values_kind"],
        "values_dtype": meta["values_dtype"],
        "with_lse": "true" if meta["with_lse"] else "false",
    }


class TeacherCache:
    """An open cache: the index checked against each listed shard's header."""

    def __init__(self, directory):
        self.dir = os.fspath(directory)
        path = os.path.join(self.dir, INDEX_FILE)
        try:
            with open(path, "rb") as f:
                index = json.load(f)
        except OSError as e:
            raise TeacherCacheError(f"{path}: cannot read the teacher cache's index: {e}") from None
        except ValueError as e:
            raise TeacherCacheError(f"{path}: not a valid index: {e}") from None
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise TeacherCacheError(
                f"{path}: format {index.get('format')!r} version {index.get('version')!r}, "
                f"expected {FORMAT!r} version {VERSION}"
            )
        self.index = index
        self.meta = index["metadata"]
        nxt = 0
        for i, s in enumerate(index["shards"]):
            if s["file"] != shard_file(i) or s["start"] != nxt or s["end"] <= s["start"]:
                raise TeacherCacheError(f"{path}: shard {i} {s} does not continue at row {nxt}")
            nxt = s["end"]
            self._check_shard(s)
        if nxt != index["total_rows"]:
            raise TeacherCacheError(f"{path}: total_rows {index['total_rows']}, shards end at {nxt}")

    @property
    def total_rows(self):
        """Rows in the cache."""
        return self.index["total_rows"]

    @property
    def k(self):
        """Entries per row."""
        return self.meta["k"]

    def __len__(self):
        return self.total_rows

    def _check_shard(self, s):
        path = os.path.join(self.dir, s["file"])
        tensors, metadata, _ = read_safetensors(path)
        want = _meta_header(self.meta)
        for key, v in want.items():
            got = metadata.get(key)
            if key == "temperature" and got not in (None, "none") and v != "none":
                # Written by Rust ("2") or Python ("2.0"): compared as numbers.
                same = float(got) == float(v)
            else:
                same = got == v
            if not same:
                raise TeacherCacheError(
                    f"{path}: metadata {key} = {metadata.get(key)!r}, the index says {v!r}"
                )
        rows = s["end"] - s["start"]
        if metadata.get("rows") != str(rows) or metadata.get("row_start") != str(s["start"]):
            raise TeacherCacheError(f"{path}: rows do not match the index's [{s['start']}, {s['end']})")
        k = self.k
        shapes = {"indices": ("I32", [rows, k]), "values": (self.meta["values_dtype"].upper(), [rows, k])}
        if self.meta["with_lse"]:
            shapes["lse"] = ("F32", [rows])
        for name, (dtype, shape) in shapes.items():
            got = tensors.get(name)
            if got is None or got[0] != dtype or got[1] != shape:
                raise TeacherCacheError(f"{path}: tensor {name} is {got}, expected {dtype} {shape}")

    def read_rows(self, start, end, torch=False):
        """Rows [start, end) across shards: (indices int32 [n, k], values
        float32 [n, k], lse float32 [n] or None); torch tensors with
        ``torch=True``."""
        if not 0 <= start <= end <= self.total_rows:
            raise TeacherCacheError(f"rows {start}:{end} are not within the cache's 0:{self.total_rows}")
        k = self.k
        parts = {"indices": [], "values": [], "lse": []}
        for s in self.index["shards"]:
            lo, hi = max(start, s["start"]), min(end, s["end"])
            if lo >= hi:
                continue
            tensors, _, data = read_safetensors(os.path.join(self.dir, s["file"]))
            a, b = lo - s["start"], hi - s["start"]
            for name in parts:
                if name not in tensors:
                    continue
                dtype, shape, (tb, te) = tensors[name]
                np_dtype, width = _DTYPES[dtype]
                per_row = width * (k if name != "lse" else 1)
                arr = np.frombuffer(data[tb + a * per_row : tb + b * per_row], dtype=np_dtype)
                if dtype == "BF16":
                    arr = _bf16_to_f32(arr)
                parts[name].append(arr.astype(np.float32 if name != "indices" else np.int32))
        n = end - start

        def cat(name, shape, dtype):
            got = parts[name]
            return np.concatenate(got).reshape(shape) if got else np.zeros(shape, dtype)

        indices = cat("indices", (n, k), np.int32)
        values = cat("values", (n, k), np.float32)
        lse = cat("lse", (n,), np.float32) if self.meta["with_lse"] else None
        if torch:
            import torch as _torch  # noqa: PLC0415 (optional)

            indices, values = _torch.from_numpy(indices), _torch.from_numpy(values)
            lse = None if lse is None else _torch.from_numpy(lse)
        return indices, values, lse

    def batches(self, batch_rows, start=0, end=None, torch=False):
        """Yields (indices, values) for each batch of ``batch_rows`` rows of
        [start, end) (the last batch may be shorter)."""
        if batch_rows < 1:
            raise TeacherCacheError("batch_rows must be >= 1")
        end = self.total_rows if end is None else end
        for lo in range(start, end, batch_rows):
            indices, values, _ = self.read_rows(lo, min(lo + batch_rows, end), torch=torch)
            yield indices, values


def _write_atomic(directory, name, payload):
    path = os.path.join(directory, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


class TeacherCacheWriter:
    """Writes (or, with ``append=True``, continues) a cache, one whole shard
    at a time: each shard, then the index, to a temporary file, fsync'd and
    renamed, as the Rust writer does."""

    def __init__(
        self,
        directory,
        k,
        vocab_size,
        values_dtype="f32",
        values_kind="logits",
        with_lse=False,
        teacher="",
        temperature=None,
        shard_rows=65536,
        append=False,
    ):
        if not 1 <= k <= vocab_size or vocab_size > 2**31 - 1:
            raise TeacherCacheError(f"k = {k} must be in [1, V = {vocab_size}]")
        if values_dtype not in ("f32", "bf16") or values_kind not in ("logits", "logprobs"):
            raise TeacherCacheError(f"values {values_kind!r} {values_dtype!r}: expected logits|logprobs, f32|bf16")
        if shard_rows < 1:
            raise TeacherCacheError("shard_rows must be >= 1")
        self.dir = os.fspath(directory)
        self.meta = {
            "k": int(k),
            "vocab_size": int(vocab_size),
            "temperature": temperature,
            "teacher": teacher,
            "values_kind": values_kind,
            "values_dtype": values_dtype,
            "with_lse": bool(with_lse),
        }
        self.shard_rows = shard_rows
        os.makedirs(self.dir, exist_ok=True)
        if append:
            index = TeacherCache(self.dir).index
            if _meta_header(index["metadata"]) != _meta_header(self.meta):
                raise TeacherCacheError(f"{self.dir}: the cache's metadata {index['metadata']} differs from {self.meta}")
            self.index = index
        else:
            if os.path.exists(os.path.join(self.dir, INDEX_FILE)):
                raise TeacherCacheError(f"{self.dir}: already holds a teacher cache ({INDEX_FILE})")
            self.index = {"format": FORMAT, "version": VERSION, "metadata": self.meta, "total_rows": 0, "shards": []}
        for name in os.listdir(self.dir):
            if name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(self.dir, name))
        if not append:
            self._write_index()
        self._pending = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()

    def push(self, indices, values, lse=None):
        """Adds rows: ``indices`` and ``values`` [rows, k] (numpy or torch),
        ``lse`` [rows] exactly when the cache holds it."""
        indices = np.asarray(_numpy(indices)).astype(np.int32).reshape(-1, self.meta["k"])
        values = np.asarray(_numpy(values), dtype=np.float32).reshape(-1, self.meta["k"])
        if indices.shape != values.shape:
            raise TeacherCacheError(f"indices {indices.shape} and values {values.shape} differ")
        if (lse is None) == self.meta["with_lse"]:
            raise TeacherCacheError("lse must be given exactly when the cache holds it")
        if indices.size and (indices.min() < 0 or indices.max() >= self.meta["vocab_size"]):
            raise TeacherCacheError(f"an index is outside [0, V = {self.meta['vocab_size']})")
        if lse is not None:
            lse = np.asarray(_numpy(lse), dtype=np.float32).reshape(-1)
            if lse.shape[0] != indices.shape[0]:
                raise TeacherCacheError(f"lse has {lse.shape[0]} rows, indices {indices.shape[0]}")
        self._pending.append((indices, values, lse))
        while sum(p[0].shape[0] for p in self._pending) >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self):
        """Writes the rows still buffered as a last, shorter shard."""
        rows = sum(p[0].shape[0] for p in self._pending)
        if rows:
            self._flush(rows)

    def _flush(self, rows):
        idx = np.concatenate([p[0] for p in self._pending])
        val = np.concatenate([p[1] for p in self._pending])
        lse = np.concatenate([p[2] for p in self._pending]) if self.meta["with_lse"] else None
        rest = (idx[rows:], val[rows:], None if lse is None else lse[rows:])
        self._pending = [rest] if rest[0].shape[0] else []
        k = self.meta["k"]
        vals = val[:rows]
        vbytes = (_f32_to_bf16(vals) if self.meta["values_dtype"] == "bf16" else vals.astype("<f4")).tobytes()
        blobs = [("indices", "I32", [rows, k], idx[:rows].astype("<i4").tobytes()),
                 ("values", self.meta["values_dtype"].upper(), [rows, k], vbytes)]
        if lse is not None:
            blobs.append(("lse", "F32", [rows], lse[:rows].astype("<f4").tobytes()))
        start = self.index["total_rows"]
        metadata = dict(_meta_header(self.meta), rows=str(rows), row_start=str(start))
        header = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape, b in blobs:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(b)]}
            offset += len(b)
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        hbytes += b" " * (-len(hbytes) % 8)
        payload = struct.pack("<Q", len(hbytes)) + hbytes + b"".join(b for *_, b in blobs)
        name = shard_file(len(self.index["shards"]))
        _write_atomic(self.dir, name, payload)
        self.index["shards"].append({"file": name, "start": start, "end": start + rows})
        self.index["total_rows"] = start + rows
        self._write_index()

    def _write_index(self):
        _write_atomic(self.dir, INDEX_FILE, (json.dumps(self.index, indent=2) + "\n").encode())


def _numpy(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return x
