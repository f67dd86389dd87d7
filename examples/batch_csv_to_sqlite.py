"""Score a CSV file into a SQLite table with servekit.batch.

The input has one malformed line and one row the model cannot score: both go to an
error file with their key and the reason, and every other row lands in the table with
its key, so the scores join back to the input. Run: ``python examples/batch_csv_to_sqlite.py``.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from pathlib import Path

import servekit as sk
from servekit.batch import SQLSink, run_batch

CSV = """customer_id,tenure_months,monthly_spend,plan
c-001,3,79.5,basic
c-002,48,20.0,premium
c-003,twelve,55.0,basic
c-004,12,55.0,basic,extra-field
c-005,30,99.9,premium
"""


@sk.model(per_item=True)
def churn_risk(row: dict[str, float]) -> float:
    """A stand-in churn model: short tenure and high spend mean risk."""
    tenure, spend = float(row["tenure_months"]), float(row["monthly_spend"])
    return round(min(1.0, spend / 100 / (1 + tenure / 12)), 3)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "customers.csv").write_text(CSV)
        database = sqlite3.connect(folder / "scores.db")
        report = run_batch(
            churn_risk,
            folder / "customers.csv",
            SQLSink(database, "churn_scores"),
            key="customer_id",
            columns=["tenure_months", "monthly_spend"],
            passthrough=["plan"],
            output="risk",
            error_sink=folder / "errors.jsonl",
            progress=False,
        )
        print(report)
        for row in database.execute("SELECT customer_id, plan, risk FROM churn_scores"):
            print("scored:", row)
        for line in (folder / "errors.jsonl").read_text().splitlines():
            error = json.loads(line)
            print(f"failed: row {error['row']} ({error['stage']}): {error['message'][:60]}")
        database.close()


if __name__ == "__main__":
    main()
