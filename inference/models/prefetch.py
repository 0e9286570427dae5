"""Decode the next job's DICOM series while the current job's inference runs.

On a GPU the forward passes leave the CPU mostly idle, and decoding a 300-image CT series takes
seconds; a worker can hand the next queued series to a :class:`VolumePrefetcher` before it calls
``model.segment`` on the current one, and take the decoded volume when it claims that job. Only
files that are unchanged since the prefetch started (same paths, sizes and modification times)
are taken; anything else is decoded again, so a prefetch can never put stale pixels in a result.
Errors in a prefetch are not reported from the background: ``take`` decodes again in the caller's
thread, which raises the usual, clear :class:`inference.volume.VolumeError`.

Hook for the worker loop (one call each side of ``model.segment``)::

    volume = prefetcher.take(claim.instance_paths, allow_partial=allow_partial)  # instead of load_series_volume
    prefetcher.prefetch(paths_of_the_oldest_queued_job, allow_partial=allow_partial)  # read-only peek, no claim
    segmentation = model.segment(volume)
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from inference.volume import Volume, load_series_volume

LOG = logging.getLogger(__name__)

FilesKey = tuple[tuple[str, int, int], ...]


def files_key(paths: Sequence[Path]) -> FilesKey | None:
    """The series' files as (path, size, mtime) in path order; None if any is unreadable."""
    entries = []
    for path in sorted(str(p) for p in paths):
        try:
            status = os.stat(path)
        except OSError:
            return None
        entries.append((path, status.st_size, status.st_mtime_ns))
    return tuple(entries)


class VolumePrefetcher:
    """One background thread that decodes at most one series ahead."""

    def __init__(self, loader: Callable[..., Volume] = load_series_volume) -> None:
        self._loader = loader
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dicom-prefetch")
        self._lock = threading.Lock()
        self._pending: tuple[FilesKey, bool, Future[Volume]] | None = None

    def prefetch(self, paths: Sequence[Path], *, allow_partial: bool = True) -> bool:
        """Start decoding ``paths`` in the background (replacing any earlier prefetch); returns whether it started."""
        key = files_key(paths)
        if key is None or not key:
            return False
        with self._lock:
            if self._pending is not None and self._pending[0] == key and self._pending[1] == allow_partial:
                return True
            if self._pending is not None:
                self._pending[2].cancel()
            future = self._executor.submit(self._loader, [Path(p) for p, _, _ in key], allow_partial=allow_partial)
            self._pending = (key, allow_partial, future)
        return True

    def take(self, paths: Sequence[Path], *, allow_partial: bool = True) -> Volume:
        """The decoded volume of ``paths``: the prefetched one if its files are unchanged, else decoded now."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            key, partial, future = pending
            if partial == allow_partial and key == files_key(paths) and not future.cancelled():
                try:
                    volume = future.result()
                    if key == files_key(paths):  # nothing changed while it was being decoded
                        return volume
                except Exception as exc:  # noqa: BLE001 - decoded again below, which reports the problem
                    LOG.debug(
                        "The prefetched series could not be decoded in the background (%s); decoding it now.", exc
                    )
            else:
                future.cancel()
        return self._loader(list(paths), allow_partial=allow_partial)

    def close(self) -> None:
        """Stop the background thread (a running decode finishes first)."""
        with self._lock:
            if self._pending is not None:
                self._pending[2].cancel()
            self._pending = None
        self._executor.shutdown(wait=True)
