"""The SQLite trace store: every rollout, its LLM calls, tool events and rewards.

The policy server records each call here (prompt and completion token ids, sampling
log-probs, text, tool calls) under a rollout id; the runner opens and finishes rollouts and
stores their rewards; the trainers read the calls back. Several threads of one process and
several processes write to one file at once (an agent in another process reporting its
reward while the server records its calls), so the store uses SQLite's WAL journal (readers
never block the writer), a generous busy timeout (writers queue instead of failing), one
connection per thread, and short transactions. Each `record_call` is one transaction that
takes the write lock first (`BEGIN IMMEDIATE`) and then reads the rollout's call counter, so
the per-rollout index is assigned without races; a process killed with SIGKILL loses at
most the transaction it had open.

Token ids and log-probs are stored as JSON text: Python's `repr` of a float round-trips
exactly, so the trainer gets back the very numbers the sampler produced (no float32 cast).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from brainforge.errors import BrainforgeError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Bumped whenever the tables change; a store written by a newer brainforge is refused."""

BUSY_TIMEOUT_MS = 30_000
"""How long a writer waits for another's transaction before giving up (many writers queue)."""

RUNNING = "running"
FINISHED_STATUSES = ("succeeded", "failed", "timeout")
STATUSES = (RUNNING, *FINISHED_STATUSES)

DEFAULT_STORE = Path(".brainforge") / "traces.sqlite"
"""Where `brainforge serve` records and `brainforge traces` looks when no --store is given."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    rollout_id TEXT PRIMARY KEY,
    task_id    TEXT,
    group_id   TEXT,
    task       TEXT,
    status     TEXT NOT NULL,
    reward     REAL,
    error      TEXT,
    created    REAL NOT NULL,
    finished   REAL,
    metadata   TEXT NOT NULL DEFAULT '{}',
    num_calls  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS rollouts_by_created ON rollouts (created);
CREATE INDEX IF NOT EXISTS rollouts_by_status ON rollouts (status, created);
CREATE INDEX IF NOT EXISTS rollouts_by_group ON rollouts (group_id, created);
CREATE INDEX IF NOT EXISTS rollouts_by_task ON rollouts (task_id, created);
CREATE TABLE IF NOT EXISTS calls (
    call_id        INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id     TEXT REFERENCES rollouts (rollout_id) ON DELETE CASCADE,
    call_index     INTEGER,
    messages       TEXT NOT NULL,
    tools          TEXT,
    prompt_ids     TEXT NOT NULL,
    completion_ids TEXT NOT NULL,
    logprobs       TEXT NOT NULL,
    text           TEXT NOT NULL,
    tool_calls     TEXT NOT NULL,
    finish_reason  TEXT NOT NULL,
    params         TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    reward         REAL,
    tokenizer      TEXT,
    created        REAL NOT NULL,
    UNIQUE (rollout_id, call_index)
);
CREATE TABLE IF NOT EXISTS tool_events (
    event_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id TEXT NOT NULL REFERENCES rollouts (rollout_id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    arguments  TEXT NOT NULL,
    output     TEXT NOT NULL,
    error      TEXT,
    call_index INTEGER,
    created    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tool_events_by_rollout ON tool_events (rollout_id, event_id);
"""
_TABLES = {"schema_version", "rollouts", "calls", "tool_events", "sqlite_sequence"}


class UnknownRolloutError(BrainforgeError):
    """A rollout id that is not in the store (the server answers 404 to it)."""


@dataclass
class CallRecord:
    """One LLM call as the policy server saw it: exactly what went in and what was sampled."""

    rollout_id: str | None
    """None: a call made outside any rollout (plain `brainforge serve`)."""
    messages: list[dict]
    """The request's messages, as received (OpenAI format)."""
    tools: list[dict] | None
    """The request's tools (OpenAI format)."""
    prompt_ids: list[int]
    """Exactly the ids the engine was given."""
    completion_ids: list[int]
    """Exactly the ids it sampled (stop token included)."""
    logprobs: list[float]
    """Sampling log-probs of completion_ids (same length)."""
    text: str
    """The completion text (special tokens skipped)."""
    tool_calls: list[dict]
    """OpenAI layout: [{"id", "type": "function", "function": {"name", "arguments": "<json str>"}}]."""
    finish_reason: str
    """"stop" | "length" | "tool_calls"."""
    params: dict
    """temperature, top_p, max_tokens, stop, n actually used."""
    policy_version: str = ""
    """Which weights sampled it (e.g. "step-12")."""
    reward: float | None = None
    """A per-call reward, when reported."""
    call_id: int | None = None
    """Set by the store."""
    index: int | None = None
    """Position in its rollout (0, 1, ...), set by the store; None outside a rollout."""
    created: float = 0.0
    """Set by the store (time.time())."""
    tokenizer: str | None = None
    """`brainforge.data.traces.tokenizer_fingerprint` of the tokenizer of the ids, when the
    recorder knows it; the export passes it on so LUFFY can trust the token ids."""


@dataclass
class ToolEvent:
    """A tool the agent ran and what it returned (the observation the next call sees)."""

    rollout_id: str
    name: str
    arguments: Any
    """A dict, or the raw string the model wrote."""
    output: str
    error: str | None = None
    call_index: int | None = None
    """The LLM call that asked for it."""
    created: float = 0.0


@dataclass
class RolloutRecord:
    """One run of an agent on one task."""

    rollout_id: str
    task_id: str | None
    group_id: str | None
    """Rollouts compared with each other (one task at one step)."""
    task: dict | None
    status: str
    """"running" | "succeeded" | "failed" | "timeout"."""
    reward: float | None
    error: str | None
    created: float
    finished: float | None
    metadata: dict
    calls: list[CallRecord] = field(default_factory=list)
    """Filled by get_rollout, [] in list_rollouts."""
    tool_events: list[ToolEvent] = field(default_factory=list)
    """Filled by get_rollout, [] in list_rollouts."""
    num_calls: int = 0


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _ids(values: Any) -> str:
    return _dump([int(v) for v in values]) if values is not None else _dump([])


def _floats(values: Any) -> str:
    return _dump([float(v) for v in values]) if values is not None else _dump([])


def _reward(value: Any, what: str) -> float | None:
    """A finite float (numpy / torch scalars accepted), or None."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, (bool, str)) or not math.isfinite(number):
        raise BrainforgeError(f"{what}: a reward must be a finite number, got {value!r}")
    return number


class TraceStore:
    """A trace store file; safe from many threads of one process and from several processes."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        """Open (and with `create`, make) the store; `create=False` is for readers such as
        `brainforge traces`, where a missing file is a typo, not a new store."""
        self.path = Path(path)
        if not create and not self.path.exists():
            raise BrainforgeError(f"trace store {self.path}: no such file; give the store with --store PATH "
                                  "(a run folder holding traces.sqlite also works)")
        if self.path.is_dir():
            raise BrainforgeError(f"trace store {self.path}: is a directory; give a file path, e.g. {self.path / 'traces.sqlite'}")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[tuple[sqlite3.Connection, int]] = []
        self._generation = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BrainforgeError(f"trace store {self.path}: cannot create its folder ({exc}); give a writable --store path") from exc
        self._init_schema()

    # ------------------------------------------------------------------ connections

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection (a new one after fork or `close`)."""
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is not None and local.pid == os.getpid() and local.generation == self._generation:
            return conn
        try:
            conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a killed process loses nothing committed
        except sqlite3.DatabaseError as exc:
            raise self._not_a_store(exc) from exc
        local.conn, local.pid, local.generation = conn, os.getpid(), self._generation
        with self._lock:
            self._connections.append((conn, os.getpid()))
        return conn

    def _not_a_store(self, exc: Exception) -> BrainforgeError:
        return BrainforgeError(f"trace store {self.path}: cannot be opened as an SQLite trace store ({exc}); "
                               "give another --store path, or move this file away")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction that holds the write lock from its start (BEGIN IMMEDIATE),
        so a read-then-write inside it (the call counter) cannot race another writer."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            raise self._failed(exc) from exc
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise self._failed(exc) from exc

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        conn = self._connect()
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc: sqlite3.DatabaseError) -> BrainforgeError:
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return BrainforgeError(f"trace store {self.path}: still locked by another writer after "
                                   f"{BUSY_TIMEOUT_MS // 1000} s ({exc}); is a process stuck holding it?")
        return BrainforgeError(f"trace store {self.path}: {type(exc).__name__}: {exc}")

    def _init_schema(self) -> None:
        conn = self._connect()
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "schema_version" not in tables:
                raise BrainforgeError(f"trace store {self.path}: is an SQLite database of something else (tables "
                                      f"{', '.join(sorted(tables)[:5])}), not a brainforge trace store; give another --store path")
            if "schema_version" in tables:
                self._check_version(conn)
                return
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("trace store %s: journal mode is %s, not WAL (a network file system?)", self.path, mode)
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                if conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
                    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self._check_version(conn)
        except sqlite3.DatabaseError as exc:
            raise self._not_a_store(exc) from exc

    def _check_version(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        version = row[0] if row else None
        if version is None:
            raise BrainforgeError(f"trace store {self.path}: has no schema version (damaged or not a brainforge store); "
                                  "give another --store path")
        if version > SCHEMA_VERSION:
            raise BrainforgeError(f"trace store {self.path}: written by a newer brainforge (schema {version}, this one "
                                  f"reads up to {SCHEMA_VERSION}); upgrade brainforge or use another --store path")

    def close(self) -> None:
        """Close every connection this object opened (in any thread); a later call reopens.
        Connections inherited through fork are the parent's and are left alone."""
        with self._lock:
            self._generation += 1
            connections, self._connections = self._connections, []
        for conn, pid in connections:
            if pid != os.getpid():
                continue
            try:
                conn.close()
            except sqlite3.Error:  # a connection another thread is using right now
                log.debug("trace store %s: a connection could not be closed", self.path, exc_info=True)

    def __enter__(self) -> "TraceStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ rollouts

    def start_rollout(self, rollout_id: str | None = None, *, task_id: str | None = None, group_id: str | None = None,
                      task: dict | None = None, metadata: dict | None = None) -> str:
        """A new running rollout; returns its id (a fresh uuid when none is given). An id
        already in the store is refused: two rollouts would share their calls."""
        rollout_id = rollout_id or uuid.uuid4().hex
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO rollouts (rollout_id, task_id, group_id, task, status, created, metadata) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (rollout_id, None if task_id is None else str(task_id), group_id,
                     None if task is None else _dump(task), RUNNING, time.time(), _dump(metadata or {})))
            except sqlite3.IntegrityError:
                raise BrainforgeError(f"trace store {self.path}: rollout {rollout_id!r} already exists; "
                                      "use a new rollout id") from None
        return rollout_id

    def ensure_rollout(self, rollout_id: str) -> None:
        """Create `rollout_id` as running if it is unknown (external agents name their own ids)."""
        with self._write() as conn:
            self._ensure(conn, rollout_id)

    @staticmethod
    def _ensure(conn: sqlite3.Connection, rollout_id: str) -> None:
        conn.execute("INSERT OR IGNORE INTO rollouts (rollout_id, status, created) VALUES (?, ?, ?)",
                     (rollout_id, RUNNING, time.time()))

    def is_open(self, rollout_id: str) -> bool:
        """True unless the rollout exists and is finished (calls for it are then refused)."""
        rows = self._read("SELECT status FROM rollouts WHERE rollout_id = ?", (rollout_id,))
        return not rows or rows[0][0] == RUNNING

    def set_reward(self, rollout_id: str, reward: float, call_index: int | None = None) -> None:
        """The rollout's reward, or (with `call_index`) one call's reward."""
        value = _reward(reward, f"rollout {rollout_id}")
        with self._write() as conn:
            if call_index is None:
                updated = conn.execute("UPDATE rollouts SET reward = ? WHERE rollout_id = ?", (value, rollout_id)).rowcount
                if not updated:
                    raise self._unknown(rollout_id)
                return
            updated = conn.execute("UPDATE calls SET reward = ? WHERE rollout_id = ? AND call_index = ?",
                                   (value, rollout_id, int(call_index))).rowcount
            if not updated:
                if not conn.execute("SELECT 1 FROM rollouts WHERE rollout_id = ?", (rollout_id,)).fetchone():
                    raise self._unknown(rollout_id)
                count = conn.execute("SELECT num_calls FROM rollouts WHERE rollout_id = ?", (rollout_id,)).fetchone()[0]
                raise BrainforgeError(f"trace store {self.path}: rollout {rollout_id!r} has no call {call_index} "
                                      f"(it has {count} calls, indices 0..{count - 1})")

    def finish_rollout(self, rollout_id: str, status: str, reward: float | None = None, error: str | None = None) -> bool:
        """Close the rollout: later calls for it are refused. The first finish wins; a later one
        changes nothing except filling in a reward the first did not give. Returns whether this
        call closed it."""
        if status not in FINISHED_STATUSES:
            raise BrainforgeError(f"rollout {rollout_id}: status {status!r} is not a finished status; "
                                  f"use one of {', '.join(FINISHED_STATUSES)}")
        value = _reward(reward, f"rollout {rollout_id}")
        with self._write() as conn:
            row = conn.execute("SELECT status FROM rollouts WHERE rollout_id = ?", (rollout_id,)).fetchone()
            if row is None:
                raise self._unknown(rollout_id)
            if row[0] != RUNNING:
                if value is not None:
                    conn.execute("UPDATE rollouts SET reward = ? WHERE rollout_id = ? AND reward IS NULL", (value, rollout_id))
                return False
            if value is None:
                conn.execute("UPDATE rollouts SET status = ?, error = ?, finished = ? WHERE rollout_id = ?",
                             (status, error, time.time(), rollout_id))
            else:
                conn.execute("UPDATE rollouts SET status = ?, error = ?, finished = ?, reward = ? WHERE rollout_id = ?",
                             (status, error, time.time(), value, rollout_id))
            return True

    def _unknown(self, rollout_id: str) -> UnknownRolloutError:
        return UnknownRolloutError(f"trace store {self.path}: no rollout with id {rollout_id!r}; "
                                   "`brainforge traces list --store PATH` shows the ids it has")

    # ------------------------------------------------------------------ calls and tools

    def record_call(self, call: CallRecord) -> int:
        """Store one LLM call; assigns its `index` in the rollout atomically (a rollout id the
        store does not know is created as running; a finished one still takes it: a call in
        flight when its rollout timed out is kept, and the server refuses new ones through
        `is_open`). Returns the call_id; `call` is updated with call_id, index and created."""
        if len(call.logprobs) != len(call.completion_ids):
            raise BrainforgeError(f"rollout {call.rollout_id}: {len(call.logprobs)} log-probs for "
                                  f"{len(call.completion_ids)} completion tokens; there must be one per token")
        values = (_dump(call.messages), None if call.tools is None else _dump(call.tools), _ids(call.prompt_ids),
                  _ids(call.completion_ids), _floats(call.logprobs), call.text, _dump(call.tool_calls or []),
                  call.finish_reason, _dump(call.params or {}), call.policy_version or "",
                  _reward(call.reward, f"rollout {call.rollout_id}"), call.tokenizer)
        created = time.time()
        with self._write() as conn:
            index = None
            if call.rollout_id is not None:
                self._ensure(conn, call.rollout_id)
                index = conn.execute("SELECT num_calls FROM rollouts WHERE rollout_id = ?", (call.rollout_id,)).fetchone()[0]
                conn.execute("UPDATE rollouts SET num_calls = ? WHERE rollout_id = ?", (index + 1, call.rollout_id))
            cursor = conn.execute(
                "INSERT INTO calls (rollout_id, call_index, messages, tools, prompt_ids, completion_ids, logprobs, text, "
                "tool_calls, finish_reason, params, policy_version, reward, tokenizer, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (call.rollout_id, index, *values, created))
            call_id = int(cursor.lastrowid)
        call.call_id, call.index, call.created = call_id, index, created
        return call_id

    def record_tool(self, event: ToolEvent) -> int:
        """Store one tool run (the rollout is created as running if unknown); returns its id."""
        created = time.time()
        with self._write() as conn:
            self._ensure(conn, event.rollout_id)
            cursor = conn.execute(
                "INSERT INTO tool_events (rollout_id, name, arguments, output, error, call_index, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (event.rollout_id, event.name, _dump(event.arguments), str(event.output), event.error,
                 None if event.call_index is None else int(event.call_index), created))
            event_id = int(cursor.lastrowid)
        event.created = created
        return event_id

    # ------------------------------------------------------------------ reading

    def get_rollout(self, rollout_id: str) -> RolloutRecord:
        """The rollout with all its calls (index order) and tool events (recording order)."""
        rows = self._read("SELECT * FROM rollouts WHERE rollout_id = ?", (rollout_id,))
        if not rows:
            raise self._unknown(rollout_id)
        record = _rollout(rows[0])
        record.calls = self._calls(rollout_id)
        record.tool_events = [
            ToolEvent(rollout_id=r[1], name=r[2], arguments=json.loads(r[3]), output=r[4], error=r[5], call_index=r[6],
                      created=r[7])
            for r in self._read("SELECT event_id, rollout_id, name, arguments, output, error, call_index, created "
                                "FROM tool_events WHERE rollout_id = ? ORDER BY event_id", (rollout_id,))]
        return record

    def list_rollouts(self, *, status: str | None = None, group_id: str | None = None, task_id: str | None = None,
                      limit: int | None = None, newest_first: bool = False) -> list[RolloutRecord]:
        """Rollouts (without calls) in creation order, or newest first; filters are exact matches."""
        if status is not None and status not in STATUSES:
            raise BrainforgeError(f"status {status!r}: use one of {', '.join(STATUSES)}")
        where, args = [], []
        for column, value in (("status", status), ("group_id", group_id), ("task_id", task_id)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(str(value))
        sql = "SELECT * FROM rollouts" + (" WHERE " + " AND ".join(where) if where else "")
        order = "DESC" if newest_first else "ASC"
        sql += f" ORDER BY created {order}, rowid {order}"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [_rollout(row) for row in self._read(sql, tuple(args))]

    def calls(self, rollout_id: str) -> list[CallRecord]:
        """The rollout's calls in index order (an unknown id is an error, a rollout without calls gives [])."""
        if not self._read("SELECT 1 FROM rollouts WHERE rollout_id = ?", (rollout_id,)):
            raise self._unknown(rollout_id)
        return self._calls(rollout_id)

    def _calls(self, rollout_id: str) -> list[CallRecord]:
        rows = self._read(
            "SELECT call_id, rollout_id, call_index, messages, tools, prompt_ids, completion_ids, logprobs, text, tool_calls, "
            "finish_reason, params, policy_version, reward, tokenizer, created FROM calls WHERE rollout_id = ? "
            "ORDER BY call_index", (rollout_id,))
        return [CallRecord(rollout_id=r[1], messages=json.loads(r[3]), tools=None if r[4] is None else json.loads(r[4]),
                           prompt_ids=json.loads(r[5]), completion_ids=json.loads(r[6]), logprobs=json.loads(r[7]),
                           text=r[8], tool_calls=json.loads(r[9]), finish_reason=r[10], params=json.loads(r[11]),
                           policy_version=r[12], reward=r[13], call_id=r[0], index=r[2], created=r[15], tokenizer=r[14])
                for r in rows]

    def count_rollouts(self) -> int:
        """How many rollouts the store holds."""
        return int(self._read("SELECT COUNT(*) FROM rollouts")[0][0])


def _rollout(row: tuple) -> RolloutRecord:
    (rollout_id, task_id, group_id, task, status, reward, error, created, finished, metadata, num_calls) = row
    return RolloutRecord(rollout_id=rollout_id, task_id=task_id, group_id=group_id,
                         task=None if task is None else json.loads(task), status=status, reward=reward, error=error,
                         created=created, finished=finished, metadata=json.loads(metadata or "{}"), calls=[],
                         tool_events=[], num_calls=num_calls)


def resolve_store_path(target: str | Path | None) -> Path:
    """`--store`: a store file, or a run folder holding `traces.sqlite`; None = the default store."""
    if target is None:
        return DEFAULT_STORE
    path = Path(target)
    if path.is_dir():
        return path / "traces.sqlite"
    return path
