"""Text-to-SQL scores: exact match of normalised SQL, and execution match on a SQLite database.

Execution match runs the predicted and the reference query on the same database and compares the result sets:
as multisets of rows, or as lists when the reference sorts (a top-level ORDER BY). The database is opened
read-only and an authorizer admits nothing but reading, so a generated query cannot change it; each query has a
time limit. A prediction that fails (syntax error, unknown column, timeout, several statements) counts as wrong;
a reference that fails is an error in the eval data.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from weitiao.errors import ConfigError, DataError

_FENCE = re.compile(r"```(?:sql|sqlite)?\s*\n?(.*?)```", re.DOTALL | re.IGNORECASE)
_QUOTED = re.compile(r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\")")
# Actions a SELECT needs (sqlite3 authorizer codes); everything else (writes, ATTACH, PRAGMA, ...) is denied.
_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


class SqlError(Exception):
    """A query that cannot be run: invalid, not read-only, or too slow."""


def extract_sql(text: str) -> str:
    """The query in a reply: the first ```sql fenced block if there is one, else the whole reply; without the
    trailing semicolon."""
    match = _FENCE.search(text)
    query = match.group(1) if match else text
    return query.strip().rstrip(";").strip()


def normalise_sql(text: str) -> str:
    """For exact match: keywords and names lower case (quoted literals kept as written), whitespace collapsed
    and none around punctuation: `SELECT COUNT( * ) FROM t WHERE a = 'X';` -> `select count(*) from t where a='X'`."""
    parts = _QUOTED.split(extract_sql(text))
    for index in range(0, len(parts), 2):  # even parts are outside quotes
        parts[index] = re.sub(r"\s*([^\w\s])\s*", r"\1", " ".join(parts[index].lower().split()))
    return "".join(parts).strip()


def is_ordered(query: str) -> bool:
    """Whether the query's own result is sorted: an ORDER BY outside parentheses and quotes."""
    depth, outside = 0, []
    for index, part in enumerate(_QUOTED.split(query)):
        if index % 2:
            continue
        for char in part:
            depth += char == "("
            outside.append(char if depth == 0 else " ")
            depth -= char == ")"
    return re.search(r"\border\s+by\b", "".join(outside), re.IGNORECASE) is not None


class SqlDatabase:
    """A SQLite file opened read-only, running one SELECT at a time under a time limit."""

    def __init__(self, path: str | Path, timeout: float = 5.0):
        self.path, self.timeout = Path(path), timeout
        if not self.path.is_file():
            raise ConfigError(f"eval.sql_database: no such file: {self.path}")
        self.connection = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                          check_same_thread=False)
        try:
            self.connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as error:
            raise ConfigError(f"eval.sql_database: {self.path} is not a SQLite database ({error})") from None
        self.connection.set_authorizer(
            lambda action, *_: sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY)

    def run(self, query: str) -> list[tuple[Any, ...]]:
        if not query.strip():
            raise SqlError("no query")
        deadline = time.monotonic() + self.timeout
        # Called every 1000 virtual-machine steps; a non-zero return interrupts the query.
        self.connection.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        try:
            return self.connection.execute(query).fetchall()
        except (sqlite3.Error, sqlite3.Warning, ValueError) as error:  # Warning: several statements at once
            message = "timed out" if "interrupted" in str(error) else str(error)
            raise SqlError(message) from None
        finally:
            self.connection.set_progress_handler(None, 0)

    def close(self) -> None:
        self.connection.close()


def same_result(predicted: list[tuple[Any, ...]], reference: list[tuple[Any, ...]], ordered: bool) -> bool:
    return predicted == reference if ordered else Counter(predicted) == Counter(reference)


def execution_scores(predictions: Sequence[str], references: Sequence[str], database: SqlDatabase,
                     locations: Sequence[tuple[str, int]] | None = None) -> dict[str, float]:
    """Execution match (result sets equal) and the share of predictions that run at all, in percent.
    `locations` ((file, record) of each example) name the record of a reference that fails."""
    matched, runnable = 0, 0
    for index, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        gold_query = extract_sql(reference)
        try:
            gold = database.run(gold_query)
        except SqlError as error:
            path, record = locations[index] if locations else (None, None)
            raise DataError(f"the reference SQL fails on {database.path}: {error}", path=path,
                            record=record) from None
        try:
            got = database.run(extract_sql(prediction))
        except SqlError:
            continue
        runnable += 1
        matched += same_result(got, gold, is_ordered(gold_query))
    n = max(1, len(references))
    return {"sql_execution_match": 100.0 * matched / n, "sql_executable": 100.0 * runnable / n}
