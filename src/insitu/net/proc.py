"""Process helpers shared by the long-running ``serve`` commands."""
from __future__ import annotations

import logging
import os
import sys


def fast_exit(code: int = 0) -> None:
    """Leave without the interpreter's teardown of torch and friends (several seconds on a busy
    machine, which delays a restart).  Callers have committed or closed everything already;
    only the logs are left to flush."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
