"""Turn a failed download into a clear offline error instead of a urllib traceback."""

from __future__ import annotations

import contextlib
import socket
import urllib.error
from pathlib import Path

from kd_runner.errors import UserError

NETWORK_ERRORS = (urllib.error.URLError, socket.gaierror, socket.timeout, ConnectionError, TimeoutError)


@contextlib.contextmanager
def offline_guard(what: str, where: Path | str):
    try:
        yield
    except NETWORK_ERRORS as err:
        raise UserError(
            f"could not download {what} into '{where}' (no network? {type(err).__name__}: {err}); "
            "download it elsewhere and point KD_DATA_DIR / paths.data_dir at it"
        ) from None
