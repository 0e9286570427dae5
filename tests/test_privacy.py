"""Patient data at rest: what the node writes is readable by its own user only."""

from __future__ import annotations

import os
import stat

import pytest

from db.models import JobState
from dicom_node.phantom import PhantomSpec, write_phantom_series
from tests.conftest import CT_RULES, storescu

pytestmark = pytest.mark.integration


def _modes(root: str) -> dict[str, int]:
    modes = {root: stat.S_IMODE(os.lstat(root).st_mode)}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            modes[path] = stat.S_IMODE(os.lstat(path).st_mode)
    return modes


def test_instances_results_and_database_are_private_whatever_the_shell_umask(tmp_path, start_node):
    series = write_phantom_series(tmp_path / "ct", PhantomSpec(rows=64, columns=64, slices=12))
    shell_umask = os.umask(0o002)  # a permissive shell: the node (and its workers) must not inherit it
    try:
        node = start_node(rules=CT_RULES, inference={"workers": 1})
    finally:
        os.umask(shell_umask)

    assert storescu(node.port, series.files).returncode == 0
    node.wait_for_state(series.series_instance_uid, JobState.DONE, timeout=120)

    modes = _modes(str(node.storage))
    assert any(path.endswith(".dcm") and "/instances/" in path for path in modes)
    assert any("/jobs/" in path for path in modes) and any(path.endswith("dicom-node.db") for path in modes)
    readable_by_others = {path: oct(mode) for path, mode in modes.items() if mode & 0o077}
    assert readable_by_others == {}
