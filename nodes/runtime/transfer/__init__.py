"""Large files (project bundles, run logs, API packages) through JetStream: fast, bounded
memory, in the Object Store layout that ``nats object`` and nats-py also read and write.

Three modules, one per seam:

* ``layout``: the Object Store layout (stream, chunk and meta subjects, ObjectInfo), the
  meta data (``stat``, ``delete``, ``ensure_bucket``) and the errors;
* ``upload``: ``put_file``, windowed publishes with read-ahead and hashing in a thread;
* ``download``: ``get_file``, a pull consumer into a temporary file, through ``bulkfetch``
  for big objects, checked and renamed into place.

Callers use the names re-exported here (``transfer.put_file``, ``transfer.get_file``...);
tuning constants live in the module that uses them (``download.FAST_RECEIVE``...).
"""

from nodes.runtime.transfer.download import fsync_dir, get_file
from nodes.runtime.transfer.layout import (
    BLAKE3_KEY,
    DEFAULT_TIMEOUT,
    CorruptObject,
    StoredObject,
    TransferError,
    TransferStalled,
    delete,
    ensure_bucket,
    stat,
)
from nodes.runtime.transfer.upload import DEFAULT_CHUNK_SIZE, put_file

__all__ = [
    "BLAKE3_KEY",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_TIMEOUT",
    "CorruptObject",
    "StoredObject",
    "TransferError",
    "TransferStalled",
    "delete",
    "ensure_bucket",
    "fsync_dir",
    "get_file",
    "put_file",
    "stat",
]
