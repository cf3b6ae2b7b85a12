"""Every sqlite3 connection a process opens: who opened it, and its `PRAGMA synchronous`.

SQLite keeps `synchronous` per connection, so a store that sets it on some of its
connections and forgets others syncs some commits and not others. `record()`
makes each new sqlite3 connection note, as it closes, the mode it ran in.

Run as a script (`python sqlite_connections.py OUT.json fluxserve-args...`), it
records the connections of one `fluxserve` command, as another process that
shares the database, and writes them to OUT.json.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fluxserve.store import sqlite as sqlite_store

SYNCHRONOUS = {0: "off", 1: "normal", 2: "full", 3: "extra"}
STORE_SOURCE = str(Path(sqlite_store.__file__))


@dataclass
class Opened:
    opened_by: str  # the store's function that opened it
    synchronous: str | None = None  # read as it closed; None while open


def _opener() -> str:
    for frame in reversed(traceback.extract_stack()):
        if frame.filename == STORE_SOURCE and frame.name != "_connect":
            return frame.name
    return "elsewhere"


def record(patch: Any) -> list[Opened]:
    """From now on, each sqlite3 connection opened (on any thread) is listed in the
    answer. `patch(target, name, value)` replaces `sqlite3.connect` (pytest's
    monkeypatch.setattr, or setattr)."""
    opened: list[Opened] = []
    connect = sqlite3.connect

    class Observed(sqlite3.Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.opened = Opened(_opener())
            opened.append(self.opened)

        def close(self) -> None:
            if self.opened.synchronous is None:
                mode = self.execute("PRAGMA synchronous").fetchone()[0]
                self.opened.synchronous = SYNCHRONOUS[mode]
            super().close()

    def observed_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        return connect(*args, factory=Observed, **kwargs)

    patch(sqlite3, "connect", observed_connect)
    return opened


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    opened = record(setattr)
    from fluxserve.cli import app

    try:
        app(args, prog_name="fluxserve")
    finally:
        out.write_text(json.dumps([asdict(each) for each in opened]))


if __name__ == "__main__":
    main()
