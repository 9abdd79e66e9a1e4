"""Text-to-SQL scores: execution match on a SQLite database, exact match of normalised SQL, and safety."""

import sqlite3
import time

import pytest

from weitiao.config import load_config
from weitiao.errors import ConfigError, DataError
from weitiao.eval.metrics import make_extractor
from weitiao.eval.sql import SqlDatabase, execution_scores, is_ordered, normalise_sql


@pytest.fixture
def database(tmp_path):
    path = tmp_path / "shop.sqlite"
    connection = sqlite3.connect(path)
    connection.executescript("""
        CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, category TEXT, price REAL);
        INSERT INTO products VALUES (1, 'Kettle', 'kitchen', 25.0), (2, 'Toaster', 'kitchen', 40.0),
                                    (3, 'Lamp', 'home', 15.5), (4, 'Rug', 'home', 60.0), (5, 'Pan', 'kitchen', 15.5);
    """)
    connection.commit()
    connection.close()
    db = SqlDatabase(path, timeout=0.5)
    yield db
    db.close()


def scores(database, prediction, reference):
    return execution_scores([prediction], [reference], database)


@pytest.mark.parametrize("prediction, reference", [
    ("SELECT name FROM products WHERE price > 20", "select name from products where 20 < price"),
    ("SELECT COUNT(id) FROM products WHERE category = 'home'", "SELECT count(*) FROM products WHERE category='home'"),
    # without ORDER BY in the reference, row order does not matter
    ("SELECT name FROM products WHERE category = 'kitchen' ORDER BY price DESC",
     "SELECT name FROM products WHERE category = 'kitchen'"),
    ("SELECT p.name FROM products AS p WHERE p.price = (SELECT MIN(price) FROM products)",
     "SELECT name FROM products WHERE price = 15.5"),
    ("```sql\nSELECT AVG(price) FROM products;\n```", "SELECT avg(price) FROM products"),
])
def test_equivalent_queries_match(database, prediction, reference):
    assert scores(database, prediction, reference) == {"sql_execution_match": 100.0, "sql_executable": 100.0}


@pytest.mark.parametrize("prediction, reference", [
    ("SELECT name FROM products WHERE price >= 25", "SELECT name FROM products WHERE price > 25"),
    ("SELECT name, price FROM products", "SELECT name FROM products"),
    # a sorted reference: the order of the rows counts
    ("SELECT name FROM products ORDER BY price DESC", "SELECT name FROM products ORDER BY price"),
    # duplicates count: a multiset, not a set
    ("SELECT DISTINCT price FROM products WHERE price < 20", "SELECT price FROM products WHERE price < 20"),
])
def test_different_results_do_not_match(database, prediction, reference):
    assert scores(database, prediction, reference) == {"sql_execution_match": 0.0, "sql_executable": 100.0}


@pytest.mark.parametrize("prediction", [
    "SELEC name FROM products",                       # syntax error
    "SELECT colour FROM products",                    # unknown column
    "",                                               # nothing generated
    "SELECT name FROM products; DROP TABLE products",  # two statements
    "DELETE FROM products",                           # writes are refused
    "UPDATE products SET price = 0",
    "ATTACH DATABASE 'other.sqlite' AS other",
    "PRAGMA table_info(products)",
])
def test_invalid_or_writing_sql_is_wrong_not_a_crash(database, prediction):
    assert scores(database, prediction, "SELECT name FROM products") == {"sql_execution_match": 0.0,
                                                                         "sql_executable": 0.0}
    assert len(database.run("SELECT * FROM products")) == 5  # nothing changed


def test_a_slow_query_times_out(database):
    endless = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"
    started = time.monotonic()
    assert scores(database, endless, "SELECT 1")["sql_executable"] == 0.0
    assert time.monotonic() - started < 5
    assert database.run("SELECT count(*) FROM products") == [(5,)]  # the connection still works


def test_a_failing_reference_is_a_data_error_naming_the_record(database):
    with pytest.raises(DataError, match=r"test\.jsonl: record 7: the reference SQL fails .*no such column: colour"):
        execution_scores(["SELECT 1"], ["SELECT colour FROM products"], database, [("test.jsonl", 7)])


def test_database_must_be_a_sqlite_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        SqlDatabase(tmp_path / "missing.sqlite")
    (tmp_path / "notes.sqlite").write_text("not a database, just text " * 40)
    with pytest.raises(ConfigError, match="is not a SQLite database"):
        SqlDatabase(tmp_path / "notes.sqlite")


@pytest.mark.parametrize("a, b, same", [
    ("SELECT COUNT( * ) FROM t WHERE a = 'X';", "select count(*) from t where a='X'", True),
    ("```sql\nSELECT name\nFROM   t\n```", "select name from t", True),
    ("SELECT a ,b FROM t", "SELECT a, b FROM t", True),
    ("SELECT a FROM t WHERE b = 'x'", "SELECT a FROM t WHERE b = 'X'", False),  # literals keep their case
    ("SELECT a FROM t", "SELECT b FROM t", False),
])
def test_sql_exact_match_normalises_case_and_whitespace(a, b, same):
    extract = make_extractor("sql")
    assert (extract(a) == extract(b)) is same
    assert normalise_sql(a) == extract(a)


def test_order_by_is_seen_only_at_the_top_level():
    assert is_ordered("SELECT a FROM t ORDER BY a")
    assert not is_ordered("SELECT a FROM (SELECT a FROM t ORDER BY a LIMIT 3)")
    assert not is_ordered("SELECT a FROM t WHERE b = 'order by'")


def test_config_resolves_the_database_next_to_the_config_file(tmp_path, database):
    (tmp_path / "run.yaml").write_text("data: {train: t.jsonl}\neval: {sql_database: shop.sqlite}\n")
    config = load_config(tmp_path / "run.yaml")
    assert config.eval.sql_database == str(tmp_path / "shop.sqlite")
    with pytest.raises(ConfigError, match="needs eval.generation: true"):
        load_config(tmp_path / "run.yaml", ["--eval.generation", "false"])
