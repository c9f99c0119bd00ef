"""Storage backends: byte-addressed, page-cache first, thread pool for what would block."""

from .base import DEFAULT_POOL, Backend, BufferPool, RangeLock, first_mismatch, release_buffer
from .file import FileBackend

__all__ = [
    "DEFAULT_POOL",
    "Backend",
    "BufferPool",
    "FileBackend",
    "RangeLock",
    "first_mismatch",
    "release_buffer",
]
