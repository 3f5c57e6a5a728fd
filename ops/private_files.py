"""Log files only the server's user can read: server logs and audit lines name tenants, key
ids, client addresses and (with prompt logging on) user text."""

from __future__ import annotations

import logging.handlers
import os

PRIVATE_MODE = 0o600


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-rotated file created mode 0600. Rotation renames files, so the old ones keep it."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_MODE)
        os.fchmod(fd, PRIVATE_MODE)  # a file an older run left wider is narrowed too (O_CREAT keeps its mode)
        return os.fdopen(fd, self.mode, encoding=self.encoding)
