"""The soak's "must be" column is its exit code: ``Outcome.problems()`` (soak.py exits 1
when it is not empty) names typed and untyped failures, and workers lost that differ
from the workers the faults killed. A unit test of the verdict alone (no cluster)."""

from __future__ import annotations

from benchmarks._soak_load import Ledger
from benchmarks._soak_report import Outcome, markdown


def _outcome(ledger: Ledger, lost: int = 3, killed: int = 3) -> Outcome:
    return Outcome(
        duration=60.0,
        target_workers=4,
        ledger=ledger,
        faults=[],
        slowest_10s=1.0,
        workers_lost=lost,
        workers_killed=killed,
        pool_retried=0,
        late_replies_dropped=0,
    )


def test_a_clean_run_passes() -> None:
    assert _outcome(Ledger()).problems() == []


def test_typed_and_untyped_failures_fail_the_soak() -> None:
    led = Ledger()
    led.failed_typed["WorkerLostError"] += 2
    led.failed_untyped["KeyError"] += 1
    found = " | ".join(_outcome(led).problems())
    assert "typed failures: 2" in found and "untyped failures: 1" in found


def test_workers_lost_must_equal_workers_killed() -> None:
    assert "workers lost (4) differ" in " ".join(_outcome(Ledger(), lost=4).problems())
    assert _outcome(Ledger(), lost=2, killed=3).problems()  # fewer lost: a miscount too


def test_the_markdown_carries_the_verdict_of_problems() -> None:
    """--markdown writes what the README pastes: its verdict is problems(), not a
    fixed 'met'."""
    assert "Verdict: met" in markdown(_outcome(Ledger()), "header")
    led = Ledger()
    led.duplicates = 1
    text = markdown(_outcome(led), "header")
    assert "Verdict: NOT met: duplicates: 1" in text
    assert "| duplicates / lost / wrong / hung | 1 / 0 / 0 / 0 | 0 |" in text
    assert "| workers lost / killed by faults | 4 / 3 | equal |" in markdown(
        _outcome(Ledger(), lost=4), "header"
    )
