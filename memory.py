"""
memory.py -- long-term memory: conversations kept in SQLite, old turns recalled when they matter.

    memory = Memory("me.db")                     # a file: it survives restarts
    memory.add_turn("user", "My cat is called Miso.")
    ... hundreds of turns later, or after a restart ...
    memory.recall("what is my cat called?")      # -> [Recalled(text="user: My cat is called Miso.", ...)]

    python inference.py --ckpt smollm2 --memory me.db     # the REPL remembers; /remember, /forget

A model sees only its context window (a few hundred to a few thousand tokens). Everything
said earlier is lost to it, unless it is put back: every turn is stored (Python's own
sqlite3: a real database, one file, safe against a crash mid-write), and when a new message
comes, the stored turns that no longer fit the window are searched with BM25 (retrieval.py)
for the few that share its rare words, and those go into the system prompt as "things you
remember". Notes kept with /remember are searched the same way. The persona (the system
prompt) is stored too, so the assistant is the same one after a restart.

Tables: turns (id, role, content, created), notes (id, text, created), settings (key, value).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from retrieval import BM25

SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (id INTEGER PRIMARY KEY, role TEXT NOT NULL, content TEXT NOT NULL,
                                  created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Recalled:
    text: str            # "user: ..." / "assistant: ..." for a turn, the note itself for a note
    kind: str            # "turn" or "note"
    id: int
    score: float


class Memory:
    """One user's long-term memory in one SQLite file (":memory:" for a throwaway one)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:" and not Path(self.path).parent.is_dir():
            raise FileNotFoundError(f"--memory {self.path}: the folder {Path(self.path).parent} does not exist")
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False)
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ValueError(f"--memory {self.path}: not a memory database ({e}): give a new file name") from None

    def close(self):
        self.db.close()

    # --- turns ------------------------------------------------------------------

    def add_turn(self, role: str, content: str) -> int:
        with self.db:                                # one transaction: written whole or not at all
            return self.db.execute("INSERT INTO turns (role, content, created) VALUES (?, ?, ?)",
                                   (role, content, time.time())).lastrowid

    def turns(self, last: int | None = None) -> list[tuple[int, str, str]]:
        """(id, role, content) of the stored turns, oldest first; only the last `last` if given."""
        rows = self.db.execute("SELECT id, role, content FROM turns ORDER BY id DESC"
                               + (" LIMIT ?" if last is not None else ""), (last,) if last is not None else ()).fetchall()
        return rows[::-1]

    def recent_messages(self, last: int = 20) -> list[dict]:
        """The end of the conversation as chat messages (a restarted REPL continues from here)."""
        rows = self.turns(last)
        while rows and rows[0][1] != "user":         # start at a user turn
            rows = rows[1:]
        return [{"role": role, "content": content} for _, role, content in rows]

    # --- notes (/remember, /forget) -------------------------------------------------

    def remember(self, text: str) -> int:
        if not text.strip():
            raise ValueError("/remember needs the text to keep, e.g. /remember I prefer short answers")
        with self.db:
            return self.db.execute("INSERT INTO notes (text, created) VALUES (?, ?)", (text.strip(), time.time())).lastrowid

    def notes(self) -> list[tuple[int, str]]:
        return self.db.execute("SELECT id, text FROM notes ORDER BY id").fetchall()

    def forget(self, what: str = "") -> int:
        """Forget notes containing `what` (case-insensitive); "all" forgets every note and turn.
        Returns how many records went."""
        with self.db:
            if what == "all":
                return self.db.execute("DELETE FROM notes").rowcount + self.db.execute("DELETE FROM turns").rowcount
            if not what:
                raise ValueError("/forget TEXT forgets the notes containing TEXT; /forget all forgets everything")
            return self.db.execute("DELETE FROM notes WHERE instr(lower(text), lower(?)) > 0", (what,)).rowcount

    # --- the persona ----------------------------------------------------------------

    @property
    def persona(self) -> str:
        row = self.db.execute("SELECT value FROM settings WHERE key = 'persona'").fetchone()
        return row[0] if row else ""

    @persona.setter
    def persona(self, text: str):
        with self.db:
            self.db.execute("INSERT INTO settings (key, value) VALUES ('persona', ?) "
                            "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (text,))

    # --- recall -------------------------------------------------------------------

    def recall(self, query: str, k: int = 3, exclude_ids: Sequence[int] = ()) -> list[Recalled]:
        """The k stored turns and notes most relevant to the query by BM25 (only those sharing a
        term with it), best first. exclude_ids: turns the prompt holds already (the recent window)."""
        skip = set(exclude_ids)
        items = [Recalled(f"{role}: {content}", "turn", id_, 0.0) for id_, role, content in self.turns()
                 if id_ not in skip]
        items += [Recalled(text, "note", id_, 0.0) for id_, text in self.notes()]
        if not items:
            return []
        scores = BM25([item.text for item in items]).scores(query)
        ranked = sorted((s, i) for i, s in enumerate(scores) if s > 0)[::-1][:k]
        return [Recalled(items[i].text, items[i].kind, items[i].id, s) for s, i in ranked]


def system_with_memories(system: str, recalled: Sequence[Recalled]) -> str:
    """The system prompt with what was recalled appended (the model reads it before the conversation)."""
    if not recalled:
        return system
    lines = "\n".join(f"- {item.text}" for item in recalled)
    return (system + "\n\n" if system else "") + f"Things you remember from earlier conversations:\n{lines}"
