"""The HDF5 cache of computed arrays (the store: :mod:`cnnexplain.cache.store`)."""

from cnnexplain.cache.entries import DatasetInfo, Entry, LazyDataset
from cnnexplain.cache.layout import FORMAT_VERSIONS
from cnnexplain.cache.store import Cache
from cnnexplain.cache.streaming import StreamWriter

__all__ = ["FORMAT_VERSIONS", "Cache", "DatasetInfo", "Entry", "LazyDataset", "StreamWriter"]
