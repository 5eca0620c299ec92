"""Exact data or a loud failure (issue 8) in a real task run: ``dags/copyman_exact_dags.py``."""

from __future__ import annotations

import json

import pytest
from af_support import Events, PgServers, run_dag
from test_af_types_and_encodings import database, values

pytestmark = pytest.mark.usefixtures("airflow_db")

WORDS = "CREATE TABLE {} (id int, word text, day date, span interval, x float8)"


def test_exact_data_or_a_loud_failure_in_a_task_run(
    pg: PgServers, monkeypatch: pytest.MonkeyPatch, events: Events
) -> None:
    latin1 = database(pg, pg.src, "x_latin1", "LATIN1")
    utf8 = database(pg, pg.dst1, "x_utf8")
    latin1.execute(WORDS.format("words"))
    latin1.execute(
        "INSERT INTO words VALUES "
        "(1, 'café', '2000-02-01', '-1 day -02:03:04', 0.1::float8 + 0.2::float8)"
    )
    latin1.execute(
        f"ALTER DATABASE {latin1.name} SET DateStyle = 'SQL, DMY'; "
        f"ALTER DATABASE {latin1.name} SET IntervalStyle = 'sql_standard'; "
        f"ALTER DATABASE {latin1.name} SET extra_float_digits = 0"
    )
    for table in ("words_back", "words_never"):
        latin1.execute(WORDS.format(table))
    for table in ("words_from_latin1", "words_utf8", "words_copy", "words_never"):
        utf8.execute(WORDS.format(table))
    utf8.execute(
        "INSERT INTO words_utf8 VALUES (1, 'café', '2000-02-01', '1 mon', 1.5), "
        "(2, '5 €', '2000-02-02', '-1 day', -0.0)"
    )
    monkeypatch.setenv("AIRFLOW_CONN_PG_X_LATIN1", latin1.uri())
    monkeypatch.setenv("AIRFLOW_CONN_PG_X_UTF8", utf8.uri())
    spec = json.loads(utf8.connection_json(client_encoding="LATIN1"))
    spec["host"] = "localhost"
    monkeypatch.setenv("AIRFLOW_CONN_PG_X_UTF8_AGAIN", json.dumps(spec))

    run = run_dag("copyman_exact_dags.py", "copyman_test_exact")

    assert run.tis["latin1_into_utf8"] == ("success", 1)
    got = "SELECT id, word, day::text, span::text, x::text FROM {}"
    assert values(utf8, got.format("words_from_latin1")) == [
        (1, "café", "2000-02-01", "-1 days -02:03:04", "0.30000000000000004")
    ]
    assert not [e for e in events if e["event"] == "retry"], "no retry may be spent"
    failures = {e["task_id"]: e for e in events if e["event"] == "failure"}
    expected = {
        "utf8_into_latin1": ["pg_x_latin1:words_back", "UntranslatableCharacter [22P05]",
                             '"UTF8" has no equivalent in encoding "LATIN1"',
                             "Loaded: pg_x_utf8:words_copy (2 rows)"],
        "writing_query": ["source pg_x_utf8", "modifies data (DELETE on words_utf8)"],
        "same_table_twice": ["destination #2 (pg_x_utf8_again, table public.WORDS_NEVER) is "
                             "the same table as destination #1 (pg_x_utf8, table words_never)"],
    }
    for task_id, fragments in expected.items():
        assert run.tis[task_id] == ("failed", 1), task_id
        assert "AirflowFailException" in failures[task_id]["bases"]
        for fragment in fragments:
            assert fragment in failures[task_id]["message"], (task_id, fragment)
    assert latin1.scalar("SELECT count(*) FROM words_back") == 0
    assert values(utf8, got.format("words_copy") + " ORDER BY id") == values(
        utf8, got.format("words_utf8") + " ORDER BY id"
    )
    assert utf8.scalar("SELECT count(*) FROM words_utf8") == 2
    assert utf8.scalar("SELECT count(*) FROM words_never") == 0
    assert latin1.scalar("SELECT count(*) FROM words_never") == 0
