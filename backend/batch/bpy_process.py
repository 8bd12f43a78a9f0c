"""How a process that runs Blender as a Python module (bpy) ends.

bpy 4.2 and 4.5 as modules do not survive Python's own teardown once a class with Python
methods has been registered (the add-on's operators and property groups): 4.2 crashes
(SIGSEGV, status -11) and 4.5 hangs, after the frames are written. 5.0 ends normally. Such a
process calls ``end_without_teardown()`` first: it then leaves through ``os._exit`` with the
status given to ``succeeded``/``exit`` or, when Blender ends it itself (an add-on handler that
stops a render raises SystemExit, which Blender turns into its own exit), with status 1.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn

_status = [1]


def _leave() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_status[0])


def end_without_teardown() -> None:
    """From now on the process ends through ``os._exit``; status 1 unless told otherwise."""
    atexit.register(_leave)


def exit(status: int) -> NoReturn:  # noqa: A001  (the process's exit, like sys.exit)
    """End now with ``status``, skipping the teardown."""
    _status[0] = int(status)
    _leave()
