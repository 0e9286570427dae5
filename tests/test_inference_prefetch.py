"""Decoding the next series in the background: the same volume as decoding it in place, never stale pixels."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.phantom import PhantomSpec, write_phantom_series
from inference.models.prefetch import VolumePrefetcher
from inference.volume import Volume, load_series_volume


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    spec = PhantomSpec(rows=64, columns=64, slices=12, pixel_spacing=(4.0, 4.0), slice_spacing=5.0)
    return list(write_phantom_series(tmp_path / "ct", spec).files)


def test_prefetched_volume_equals_the_one_decoded_in_place_and_is_decoded_off_the_callers_thread(series):
    threads: list[str] = []

    def loader(paths: list[Path], *, allow_partial: bool = True) -> Volume:
        threads.append(threading.current_thread().name)
        return load_series_volume(paths, allow_partial=allow_partial)

    prefetcher = VolumePrefetcher(loader)
    try:
        assert prefetcher.prefetch(series)
        volume = prefetcher.take(series)
    finally:
        prefetcher.close()

    direct = load_series_volume(series)
    assert np.array_equal(volume.hu, direct.hu) and np.array_equal(volume.origin, direct.origin)
    assert threads == [threads[0]] and threads[0].startswith("dicom-prefetch")  # decoded once, in the background


def test_a_file_changed_after_the_prefetch_is_decoded_again(series):
    prefetcher = VolumePrefetcher()
    try:
        prefetcher.prefetch(series)
        prefetched_first = prefetcher.take(series)
        prefetcher.prefetch(series)
        dataset = pydicom.dcmread(series[0])
        pixels = dataset.pixel_array.copy()
        pixels[:] = 1234
        dataset.PixelData = pixels.tobytes()
        dataset.save_as(series[0])
        os.utime(series[0], ns=(1, 1))  # a different modification time, whatever the clock's resolution
        volume = prefetcher.take(series)
    finally:
        prefetcher.close()

    assert np.array_equal(volume.hu, load_series_volume(series).hu)
    assert not np.array_equal(volume.hu, prefetched_first.hu)


def test_a_series_that_cannot_be_decoded_fails_in_the_caller_as_decoding_in_place_would(series):
    series[3].write_bytes(b"not a DICOM file")
    with pytest.raises(Exception) as in_place:
        load_series_volume(series)
    prefetcher = VolumePrefetcher()
    try:
        prefetcher.prefetch(series)
        with pytest.raises(type(in_place.value)) as prefetched:
            prefetcher.take(series)
    finally:
        prefetcher.close()
    assert str(prefetched.value) == str(in_place.value)
