"""Time the damage check of JPEG frames against decoding them, per 512 x 512 slice of the real CT fixture.

The real 20-slice CT (../shared/fixtures/totalsegmentator/example_ct_dicom_valid, JPEG 2000) is re-encoded with
DCMTK's ``dcmcjpeg`` as JPEG Lossless (process 14, SV1: ``+e1``; process 14: ``+el``) and JPEG Baseline (``+eb``);
for each slice the script times pydicom's decode of the frame and ``inference.frames.jpeg_damage`` (markers,
restart markers and the Huffman-coded data walked to the frame's sample count), min and median over ``--repeats``.

    .venv/bin/python bench/jpeg_check_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.encaps import generate_frames

from inference.frames import jpeg_damage

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "totalsegmentator" / "example_ct_dicom_valid"
FORMS = {"JPEG Lossless SV1 (+e1)": "+e1", "JPEG Lossless (+el)": "+el", "JPEG Baseline (+eb)": "+eb"}


def _timed(action, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    sources = sorted(FIXTURE.glob("*.dcm"))
    with tempfile.TemporaryDirectory() as scratch:
        print(f"{'form':<26} {'slices':>6} {'bytes/slice':>11} {'decode ms (min/med)':>20} {'check ms (min/med)':>19}")
        for name, option in FORMS.items():
            decode, check, sizes = [], [], []
            for index, source in enumerate(sources):
                plain, encoded = Path(scratch) / f"{index}.dcm", Path(scratch) / f"{index}{option}.dcm"
                dataset = pydicom.dcmread(source)
                dataset.decompress()  # DCMTK reads no JPEG 2000: pydicom decodes it first
                dataset.save_as(plain)
                subprocess.run(["dcmcjpeg", option, str(plain), str(encoded)], check=True)
                dataset = pydicom.dcmread(encoded)
                frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
                sizes.append(len(frame))
                decode += _timed(lambda path=encoded: pydicom.dcmread(path).pixel_array, args.repeats)
                check += _timed(lambda data=frame: jpeg_damage(data), args.repeats)
            print(
                f"{name:<26} {len(sources):>6} {statistics.mean(sizes):>11,.0f} "
                f"{min(decode) * 1000:>9.1f} / {statistics.median(decode) * 1000:<8.1f} "
                f"{min(check) * 1000:>8.1f} / {statistics.median(check) * 1000:<8.1f}"
            )


if __name__ == "__main__":
    main()
