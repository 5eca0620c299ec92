"""What a load's verification found, per destination, as a value (``DestinationResult
.verification``): callers (the Dagster shell's asset checks) read it, not the error's text."""

from __future__ import annotations

from typing import Any

from airflow_copyman import load
from tests.conftest import Database
from tests.test_readback import endpoint

SKIP_ONE = (
    "CREATE FUNCTION skip_one() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN "
    "IF NEW.id = 1 THEN RETURN NULL; END IF; RETURN NEW; END$$; "
    "CREATE TRIGGER skip_one BEFORE INSERT ON bad FOR EACH ROW EXECUTE FUNCTION skip_one()"
)
BUMP = (
    "CREATE FUNCTION bump() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN "
    "NEW.v = NEW.v || '!'; RETURN NEW; END$$; "
    "CREATE TRIGGER bump BEFORE INSERT ON bad FOR EACH ROW EXECUTE FUNCTION bump()"
)


def load_into_good_and_bad(
    pair: tuple[Database, Database], trigger: str, **kwargs: Any
) -> tuple[load.DestinationResult, load.DestinationResult]:
    source_db, dest_db = pair
    source_db.execute("CREATE TABLE items AS SELECT g AS id, 'v' || g AS v "
                      "FROM generate_series(1, 5) g")
    dest_db.execute("CREATE TABLE good (id int, v text); CREATE TABLE bad (id int, v text)")
    dest_db.execute(trigger)
    report = load.run(
        endpoint(source_db, "src"), "items",
        [{"conn_id": "dst", "table": "good"}, {"conn_id": "dst", "table": "bad"}],
        endpoints={"dst": endpoint(dest_db, "dst")}, **kwargs,
    )
    good, bad = report.destinations
    return good, bad


def test_a_count_mismatch_is_a_failed_verification_with_both_counts(
    pair: tuple[Database, Database],
) -> None:
    good, bad = load_into_good_and_bad(pair, SKIP_ONE)
    assert good.status == "loaded" and good.verification == load.Verification(True, 5, 5)
    assert bad.status == "failed" and bad.verified is False
    assert bad.verification == load.Verification(False, 5, 4), bad


def test_a_checksum_mismatch_is_a_failed_verification_with_both_checksums(
    pair: tuple[Database, Database],
) -> None:
    good, bad = load_into_good_and_bad(pair, BUMP, verify="checksum")
    assert good.status == "loaded" and good.verified is True
    assert good.verification is not None and good.checksum is not None
    assert good.verification.source_checksum == good.verification.checksum == good.checksum
    assert bad.status == "failed" and bad.permanent
    found = bad.verification
    assert found is not None and not found.passed
    assert found.source_checksum == good.checksum and found.checksum is not None
    assert found.checksum.startswith("5:") and found.checksum != found.source_checksum
    assert "checksum" not in bad.as_dict()  # XCom shows the checksum of loaded rows only


def test_a_failure_that_compared_nothing_has_no_verification(
    pair: tuple[Database, Database],
) -> None:
    _, bad = load_into_good_and_bad(pair, "ALTER TABLE bad ADD CHECK (id > 1)")
    assert bad.status == "failed" and bad.verification is None and bad.verified is None
