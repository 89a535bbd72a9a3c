"""The mails an SMTP sink (``tools/smtp_sink.py``) stored: which arrived, when, how late.

The sink writes each accepted mail to ``<dir>/<UTC stamp>-<seq>.eml`` (atomically, by a
rename), with the envelope's recipients as ``Delivered-To`` headers. A :class:`MailDir`
reads the files that appeared since its last scan and keeps those whose recipient holds
its marker (the benchmark's tag), so that other mails of a shared sink are left alone;
:meth:`MailDir.remove` deletes the ones it matched.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

_HEADER = re.compile(rb"^([A-Za-z-]+): ?(.*)$", re.MULTILINE)
_FAILED_AT = re.compile(rb"^Failed at: (\S+)\r?$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Mail:
    """One stored mail of a notice (or a digest of several)."""

    to: str
    notice_ids: tuple[str, ...]
    arrived: float  # Unix seconds: when the sink wrote the file
    failed_at: float | None  # Unix seconds: the first failed attempt the mail reports


def parse(raw: bytes, arrived: float) -> Mail:
    """The recipient, notice ids and first 'Failed at' of a stored mail."""
    head, _, body = raw.partition(b"\r\n\r\n")
    if not body:
        head, _, body = raw.partition(b"\n\n")
    headers: dict[bytes, bytes] = {}
    for name, value in _HEADER.findall(head):
        headers.setdefault(name.lower(), value.strip())
    ids = headers.get(b"x-webhook-notice-id", b"").decode(errors="replace")
    failed = _FAILED_AT.search(body)
    failed_at = None
    if failed is not None:
        stamp = failed.group(1).decode().replace("Z", "+00:00")
        failed_at = datetime.fromisoformat(stamp).timestamp()
    return Mail(
        to=headers.get(b"delivered-to", b"").decode(errors="replace"),
        notice_ids=tuple(i.strip() for i in ids.split(",") if i.strip()),
        arrived=arrived,
        failed_at=failed_at,
    )


@dataclass
class MailDir:
    """New mails of one sink directory whose recipient contains ``marker``."""

    directory: Path
    marker: str
    _seen: set[str] = field(default_factory=set)
    _matched: list[Path] = field(default_factory=list)

    def scan(self) -> list[Mail]:
        """The matching mails stored since the last scan."""
        found: list[Mail] = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return found
        for entry in entries:
            name = entry.name
            if name in self._seen or name.startswith(".") or not name.endswith(".eml"):
                continue
            self._seen.add(name)
            try:
                raw = Path(entry.path).read_bytes()
                arrived = entry.stat().st_mtime
            except OSError:
                continue
            mail = parse(raw, arrived)
            if self.marker in mail.to:
                found.append(mail)
                self._matched.append(Path(entry.path))
        return found

    def remove(self) -> int:
        """Delete every mail file matched so far; how many were."""
        removed = 0
        for path in self._matched:
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        self._matched.clear()
        return removed
