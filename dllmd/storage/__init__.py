"""Everything durable a node or a client keeps: atomic writes, chunked receives into a staging area,
atomic directory replacement, and signed JSON documents (``dllmd.storage.signed``)."""

from dllmd.storage.atomic import atomic_write, fsync_dir, fsync_file, fsync_tree
from dllmd.storage.digest import sha256_file
from dllmd.storage.room import DiskFull, ensure_room, is_disk_full, save_tensors
from dllmd.storage.staged import DigestMismatch, StagedFile, StagingError, TooManyBytes, WrongOffset
from dllmd.storage.swap import recover_directories, remove_directory, replace_directory

__all__ = ["atomic_write", "fsync_dir", "fsync_file", "fsync_tree", "sha256_file", "StagedFile", "StagingError",
           "WrongOffset", "TooManyBytes", "DigestMismatch", "replace_directory", "remove_directory",
           "recover_directories", "DiskFull", "ensure_room", "is_disk_full", "save_tensors"]
