"""Per-field vocabularies: raw Criteo value -> frequency rank (0 = most frequent on train).

Categorical fields (``C1..C26``) are keyed by the uint32 value of their 8 hex chars;
bucketised integer fields (``B1..B13``) by ``schema.bucket_key`` of the raw integer, a
missing integer being its own key (``MISSING_BUCKET``). Missing categoricals, values seen
fewer than ``min_count`` times on the train split and values never seen there share one
OOV id per field, ranked by its combined count like any other value.

Stored as a directory of ``.npy`` files (per field: sorted keys and their ids) plus
``index.json``; loading memory-maps them, so worker processes share one copy. The pages a
lookup touches count in the process's RSS until it drops them: ``ids_of(..., slice_keys=n)``
looks keys up in slices of ``n`` entries (12 B each) and drops each slice's pages after
it, so a lookup keeps about ``12 n`` bytes of a vocabulary of any size resident (plus
what the kernel maps around a fault at either end of a slice: 64 KiB, or a large folio
of the page cache, 2 MiB at most).

Example:
    >>> vocab = Vocabulary.load("data/criteo/vocab")          # doctest: +SKIP
    >>> vocab.lookup("C1", ["05db9164", "", "ffffffff"])      # doctest: +SKIP
    array([0, 7, 7], dtype=int32)
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from pipeline.data.schema import BUCKET_FIELDS, bucket_key

MISSING_BUCKET = np.iinfo(np.int64).min  # bucket key of a missing integer
INDEX_FILE = "index.json"
VOCAB_BYTES_PER_KEY = 12  # int64 key + int32 id

# byte -> nibble value, 255 for a byte that is not a hex digit
_HEX_LUT = np.full(256, 255, dtype=np.uint8)
for _digit, _byte in enumerate(b"0123456789abcdef"):
    _HEX_LUT[_byte] = _digit
for _digit, _byte in enumerate(b"ABCDEF", start=10):
    _HEX_LUT[_byte] = _digit


def hex_bytes_to_uint32(digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode rows of 8 ASCII hex bytes (``uint8[n, 8]``) to ``(uint32[n], ok[n])``."""
    nibbles = np.ascontiguousarray(_HEX_LUT[digits])
    ok = (nibbles.view(np.uint64)[:, 0] & np.uint64(0xF0F0F0F0F0F0F0F0)) == 0
    packed = np.ascontiguousarray((nibbles[:, 0::2] << 4) | nibbles[:, 1::2])
    return packed.view(">u4")[:, 0].astype(np.uint32), ok


def parse_hex(values: Sequence[str | bytes | None] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parse Criteo categorical strings to ``(uint32 values, missing mask)``.

    Empty strings and ``None`` are missing (value 0). Anything else must be 8 hex chars.

    >>> parse_hex(["0000000a", "", "FFFFFFFF"])
    (array([        10,          0, 4294967295], dtype=uint32), array([False,  True, False]))
    """
    raw = [b"" if v is None else v.encode("ascii") if isinstance(v, str) else bytes(v) for v in values]
    lengths = np.fromiter((len(v) for v in raw), dtype=np.int64, count=len(raw))
    missing = lengths == 0
    bad = ~missing & (lengths != 8)
    digits = np.frombuffer(b"".join(v if len(v) == 8 else b"0" * 8 for v in raw), dtype=np.uint8)
    decoded, ok = hex_bytes_to_uint32(digits.reshape(len(raw), 8))
    bad |= ~ok
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"not a Criteo categorical (8 hex chars or empty): {raw[first]!r}")
    decoded[missing] = 0
    return decoded, missing


def frequency_rank(
    keys: np.ndarray, counts: np.ndarray, oov_count: int, min_count: int
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """Rank a field's train values by count; rare ones join the OOV id.

    Args:
        keys: distinct train keys, sorted ascending.
        counts: their train counts.
        oov_count: train rows whose value is missing (it always maps to OOV).
        min_count: keys with ``count < min_count`` map to OOV.

    Returns:
        ``(kept_keys, kept_ids, oov_id, id_counts)``: kept keys (sorted) and their ids,
        the OOV id, and train counts indexed by id (non-increasing). Ties are broken by
        putting OOV first, then by ascending key.

    >>> frequency_rank(np.array([1, 2, 3, 4]), np.array([5, 1, 5, 9]), oov_count=3, min_count=2)
    (array([1, 3, 4]), array([1, 2, 0], dtype=int32), 3, array([9, 5, 5, 4]))
    """
    keys = np.asarray(keys, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    keep = counts >= max(min_count, 1)
    oov_total = int(oov_count) + int(counts[~keep].sum())
    kept_keys, kept_counts = keys[keep], counts[keep]
    order = np.lexsort((kept_keys, -kept_counts))
    ranked = kept_counts[order]
    oov_id = int(np.searchsorted(-ranked, -oov_total, side="left"))
    positions = np.arange(order.size)
    ids = np.empty(order.size, dtype=np.int32)
    ids[order] = positions + (positions >= oov_id)
    return kept_keys, ids, oov_id, np.insert(ranked, oov_id, oov_total)


@dataclass(frozen=True)
class FieldVocab:
    """One field's sorted keys, their ids, the shared OOV id, and the mappings of the
    keys and ids files when memory-mapped (``Vocabulary.load``)."""

    keys: np.ndarray
    ids: np.ndarray
    oov_id: int
    mappings: tuple[mmap.mmap, ...] = ()

    @property
    def size(self) -> int:
        return int(self.keys.size) + 1

    def ids_of(self, keys: np.ndarray, missing: np.ndarray | None = None, slice_keys: int = 0) -> np.ndarray:
        """Ids of int64 ``keys``; unknown keys and rows flagged ``missing`` get the OOV id.

        With ``slice_keys``, the keys are sorted and looked up in slices of that many
        vocabulary entries, and each slice's mapped pages are dropped after it (the page
        cache keeps them): the ids are the same, the resident pages at most one slice's.

        >>> v = FieldVocab(np.array([3, 5, 8, 9]), np.array([2, 0, 3, 1], np.int32), oov_id=4)
        >>> v.ids_of(np.array([9, 3, 4, 5]), slice_keys=2)
        array([1, 2, 4, 0], dtype=int32)
        """
        keys = np.asarray(keys, dtype=np.int64)
        if slice_keys and self.keys.size > slice_keys:
            ids = np.empty(keys.shape, np.int32)
            order = np.argsort(keys)
            cuts = np.r_[0, np.searchsorted(keys[order], self.keys[slice_keys::slice_keys]), keys.size]
            self.drop_pages()  # the slice boundaries' pages
            for lo, a, b in zip(range(0, self.keys.size, slice_keys), cuts[:-1], cuts[1:]):
                ids[order[a:b]] = self._ids_in(keys[order[a:b]], lo, lo + slice_keys)
                self.drop_pages()
        else:
            ids = self._ids_in(keys, 0, self.keys.size)
            if slice_keys:
                self.drop_pages()
        if missing is not None:
            ids[missing] = self.oov_id
        return ids

    def _ids_in(self, keys: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Ids of ``keys`` among vocabulary entries ``[lo, hi)`` (OOV if not there)."""
        part = self.keys[lo:hi]
        if part.size == 0:
            return np.full(keys.shape, self.oov_id, dtype=np.int32)
        pos = np.searchsorted(part, keys)
        np.minimum(pos, part.size - 1, out=pos)
        return np.where(part[pos] == keys, self.ids[lo:hi][pos], np.int32(self.oov_id)).astype(np.int32, copy=False)

    def drop_pages(self) -> None:
        """Unmap the pages lookups touched from this process (no-op unless memory-mapped)."""
        for mapping in self.mappings:
            mapping.madvise(mmap.MADV_DONTNEED)


class Vocabulary:
    """Frequency-rank vocabularies of every categorical (``C*``) and bucket (``B*``) field."""

    def __init__(self, fields: dict[str, FieldVocab]):
        self.fields = fields

    @property
    def sizes(self) -> dict[str, int]:
        return {name: f.size for name, f in self.fields.items()}

    @property
    def oov_ids(self) -> dict[str, int]:
        return {name: f.oov_id for name, f in self.fields.items()}

    @property
    def num_keys(self) -> int:
        """Stored keys of all fields (``VOCAB_BYTES_PER_KEY`` each)."""
        return sum(int(f.keys.size) for f in self.fields.values())

    def lookup(self, field: str, values, missing: np.ndarray | None = None) -> np.ndarray:
        """Ids of raw values of ``field``.

        ``C*`` fields take hex strings (``""``/``None`` missing) or a uint32 array (with an
        optional ``missing`` mask); ``B*`` fields take raw integers, as strings (``""``
        missing) or an int array (with an optional ``missing`` mask).
        """
        vocab = self.fields[field]
        arr = values if isinstance(values, np.ndarray) else None
        if field in BUCKET_FIELDS:
            if arr is None:
                texts = ["" if v is None else str(v) for v in values]
                missing = np.array([t == "" for t in texts], dtype=bool)
                arr = np.array([int(t) if t else 0 for t in texts], dtype=np.int64)
            keys = bucket_key(arr)
            if missing is not None:
                keys = np.where(missing, MISSING_BUCKET, keys)
            return vocab.ids_of(keys)
        if arr is None or arr.dtype.kind in "USO":
            arr, missing = parse_hex(list(values))
        return vocab.ids_of(arr.astype(np.int64), missing)

    def renumbered(self, maps: Mapping[str, Callable[[np.ndarray], np.ndarray]]) -> "Vocabulary":
        """This vocabulary with field ``f``'s ids (and OOV id) replaced by ``maps[f]`` of
        them: the same keys mapped straight to another numbering (fields not in ``maps``
        as they are). The new ids are in memory (int32).

        >>> v = Vocabulary({"C1": FieldVocab(np.array([3, 5]), np.array([1, 0], np.int32), oov_id=2)})
        >>> w = v.renumbered({"C1": lambda ids: 2 - ids})
        >>> w.fields["C1"].ids.tolist(), w.oov_ids
        ([1, 2], {'C1': 0})
        """
        fields = dict(self.fields)
        for name, renumber in maps.items():
            f = fields[name]
            ids = np.asarray(renumber(np.append(f.ids, f.oov_id)), dtype=np.int32)
            fields[name] = FieldVocab(f.keys, ids[:-1], int(ids[-1]), f.mappings[:1])
        return Vocabulary(fields)

    def save(self, directory: str | Path) -> None:
        """Write atomically: a sibling temp directory renamed into place."""
        writer = VocabularyWriter(directory)
        for name, f in self.fields.items():
            writer.add_field(name, f.keys.size, f.oov_id, [(f.keys, f.ids)])
        writer.close()

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True) -> "Vocabulary":
        """Read a saved vocabulary; ``mmap`` shares the arrays between processes."""
        directory = Path(directory)
        index = json.loads((directory / INDEX_FILE).read_text())["fields"]
        fields = {}
        for name, entry in index.items():
            paths = (directory / f"{name}.keys.npy", directory / f"{name}.ids.npy")
            if mmap:
                (keys, keys_map), (ids, ids_map) = (_map_npy(p) for p in paths)
                fields[name] = FieldVocab(keys, ids, int(entry["oov_id"]), (keys_map, ids_map))
            else:
                fields[name] = FieldVocab(np.load(paths[0]), np.load(paths[1]), int(entry["oov_id"]))
        return cls(fields)


def _map_npy(path: Path) -> tuple[np.ndarray, mmap.mmap]:
    """A ``.npy`` file's array, memory-mapped read-only, and its mapping."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(mapping, dtype, int(np.prod(shape)), f.tell()).reshape(shape), mapping


class VocabularyWriter:
    """Writes a vocabulary directory field by field, each field's sorted keys arriving in
    ascending pieces, so no field has to fit in memory; ``close`` renames it into place.

    >>> w = VocabularyWriter("out/vocab")                              # doctest: +SKIP
    >>> w.add_field("C1", 3, oov_id=1, pieces=[(np.array([4, 9]), np.array([0, 2])),
    ...                                        (np.array([70]), np.array([3]))])  # doctest: +SKIP
    >>> w.close()                                                      # doctest: +SKIP
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.tmp = self.directory.with_name(self.directory.name + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.index: dict[str, dict] = {}

    def add_field(self, name: str, num_keys: int, oov_id: int, pieces) -> None:
        """``pieces``: ``(keys, ids)`` pairs, keys ascending across pieces, ``num_keys`` in all."""
        header = {"fortran_order": False, "shape": (num_keys,)}
        with open(self.tmp / f"{name}.keys.npy", "wb") as keys_file, open(self.tmp / f"{name}.ids.npy", "wb") as ids_file:
            np.lib.format.write_array_header_1_0(keys_file, {**header, "descr": np.lib.format.dtype_to_descr(np.dtype(np.int64))})
            np.lib.format.write_array_header_1_0(ids_file, {**header, "descr": np.lib.format.dtype_to_descr(np.dtype(np.int32))})
            written = 0
            for keys, ids in pieces:
                np.ascontiguousarray(keys, dtype=np.int64).tofile(keys_file)
                np.ascontiguousarray(ids, dtype=np.int32).tofile(ids_file)
                written += len(keys)
        if written != num_keys:
            raise ValueError(f"vocabulary field {name}: {written} keys written, {num_keys} announced")
        self.index[name] = {"size": num_keys + 1, "oov_id": int(oov_id)}

    def close(self) -> None:
        (self.tmp / INDEX_FILE).write_text(json.dumps({"fields": self.index}, indent=1))
        shutil.rmtree(self.directory, ignore_errors=True)
        os.replace(self.tmp, self.directory)
