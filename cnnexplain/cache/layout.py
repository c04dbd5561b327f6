"""How cache entries are stored: code-format versions per kind, the partial-file suffix, the
stored dtype (float16 option) and the chunking and filters of each dataset."""

from __future__ import annotations

import h5py
import numpy as np

from cnnexplain.errors import CnnexplainError

FORMAT_VERSIONS: dict[str, int] = {
    "activations": 1,  # layer activations over a dataset (cnnexplain.activations)
    "gate": 1,         # gate matrices W [K, C] / P [C, K]
    "saliency": 1,     # saliency maps of one method over a dataset
    "dissection": 1,   # Network Dissection thresholds and tallies
    "cav": 1,          # concept activation vectors
    "tcav": 1,         # TCAV scores
    "features": 1,     # other per-image feature arrays
}
"""Code-format version per kind of entry; part of every key. Bump a kind's version whenever the
code that computes or lays out its arrays changes meaning, and every old entry of that kind
stops being reused."""

CHUNK_BYTES = 1 << 20
"""Target size of one HDF5 chunk (uncompressed) of the widest dataset of an entry."""
PARTIAL_SUFFIX = ".partial.h5"


def _stored_dtype(dtype, float16: bool) -> np.dtype:
    dtype = np.dtype(dtype)
    if float16 and dtype.kind == "f":
        return np.dtype(np.float16)
    return dtype


def _to_stored(name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast ``array`` to the stored dtype; a value beyond the float16 range is an error, not inf."""
    if array.dtype == dtype:
        return array
    with np.errstate(over="ignore"):
        out = array.astype(dtype)
    if dtype == np.float16:
        overflow = np.isinf(out) & np.isfinite(array)
        if overflow.any():
            largest = float(np.abs(array[np.isfinite(array)]).max())
            raise CnnexplainError(f"values of {name} exceed the float16 range (largest |value| "
                                  f"{largest:.4g} > 65504); the cache entry was not written",
                                  "store float32: leave out the float16 option (`float16`)")
    return out


def _block_rows(row_shapes: list[tuple[tuple[int, ...], np.dtype]]) -> int:
    """Rows per chunk: a power of two so the widest dataset's chunk is about CHUNK_BYTES."""
    row_bytes = max((int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in row_shapes),
                    default=1)
    rows = max(1, CHUNK_BYTES // max(row_bytes, 1))
    return 1 << (int(rows).bit_length() - 1)


STORAGE = {"name": "uncompressed", "filters": {}}
"""The compression filters of every cache dataset; fletcher32 checksums come on top of them.
None: ``benchmarks/bench_cache.py`` measured writing ResNet-18's layer1-4 maps at 224 px at
0.09 of the forward pass that produced them uncompressed, against 0.95 with gzip-1 + shuffle
(1.8x smaller), 0.48 with LZF and 0.14 with hdf5plugin's LZ4 (which every reader would need),
so only uncompressed entries keep the cache off the critical path; any HDF5 reader opens
them. Entries written with gzip by earlier versions read the same (HDF5 records each
dataset's filters)."""


def storage_options() -> dict:
    """``{"name", "filters"}`` of :data:`STORAGE` (a copy)."""
    return {"name": STORAGE["name"], "filters": dict(STORAGE["filters"])}


def _storage(shape: tuple[int, ...], dtype: np.dtype, block_rows: int) -> dict:
    """create_dataset options: chunked along rows, :data:`STORAGE`'s filters, fletcher32
    checksums."""
    if len(shape) == 0 or 0 in shape or h5py.check_string_dtype(dtype) is not None:
        return {}
    return dict(chunks=(min(block_rows, shape[0]), *shape[1:]), fletcher32=True,
                **STORAGE["filters"])
