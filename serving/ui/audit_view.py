"""The Audit page's reading of the audit log: the file `--audit-file` writes (and its unencrypted
rotated files), newest first, filtered by action, tenant and time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

MAX_SCAN_BYTES = 16 * 2**20  # newest files first; older lines beyond this are not read


@dataclass(frozen=True)
class AuditFilter:
    action: str = ""  # exact action, or a prefix ending in "." ("key." for key.create and key.revoke)
    tenant: str = ""
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, line: dict) -> bool:
        action = str(line.get("action", ""))
        if self.action and not (action == self.action or (self.action.endswith(".") and action.startswith(self.action))):
            return False
        if self.tenant and line.get("tenant") != self.tenant:
            return False
        if self.since or self.until:
            when = parse_time(str(line.get("time", "")))
            if when is None or (self.since and when < self.since) or (self.until and when > self.until):
                return False
        return True


def parse_time(text: str) -> datetime | None:
    """ISO 8601; a value without a zone is UTC (as the audit lines and the page's fields are)."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def read_audit(path: str | None, where: AuditFilter, limit: int = 200) -> list[dict]:
    """The newest `limit` lines that match, newest first; [] without a file."""
    if not path:
        return []
    base = Path(path)
    files = [base, *sorted(base.parent.glob(base.name + ".[0-9]*"),
                           key=lambda p: int(p.suffix[1:]) if p.suffix[1:].isdigit() else 1 << 30)]
    found: list[dict] = []
    scanned = 0
    for file in files:
        if not file.exists() or not file.suffix[1:].isdigit() and file != base:
            continue  # .enc files are sealed with the KMS: not read here
        data = file.read_bytes()[-(MAX_SCAN_BYTES - scanned):] if scanned < MAX_SCAN_BYTES else b""
        scanned += len(data)
        for raw in reversed(data.splitlines()):
            try:
                line = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(line, dict) and where.matches(line):
                found.append(line)
                if len(found) >= limit:
                    return found
    return found
