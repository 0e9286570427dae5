"""Patient data at rest: every file and folder the node creates is its own user's alone.

The node sets its process umask to 077 when any ``dicom-node`` command starts, so
instance files, quarantine, job folders, results and the SQLite database are created
0600 and their folders 0700, whatever the shell's umask. Worker processes inherit it.
Folders from an older install are not changed; :func:`loose_permissions` finds them
so that ``serve`` can say so at start.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077


def keep_new_files_private() -> None:
    """Files the process creates from now on: 0600; folders: 0700."""
    os.umask(PRIVATE_UMASK)


def loose_permissions(folder: Path, limit: int = 20) -> list[Path]:
    """Up to ``limit`` entries directly in ``folder`` (and the folder) that group or others can read.

    None when ``folder`` is not a folder (absent, or a file: start-up says so), or as many as can be looked at
    when it cannot be listed.
    """
    if not folder.is_dir():
        return []
    try:
        entries = sorted(folder.iterdir())
    except OSError:  # not readable by this user: start-up reports what it cannot do there
        entries = []
    found = []
    for path in (folder, *entries):
        try:
            mode = path.lstat().st_mode
        except OSError:  # removed meanwhile
            continue
        if stat.S_IMODE(mode) & 0o077:
            found.append(path)
            if len(found) >= limit:
                break
    return found
