"""Runs a gold and a predicted SQL query over a generated database; written by chorus' `sql`
environment into the sandbox. stdin: {"tables": [{name, ddl, columns, rows}], "gold", "predicted",
"limit_ms"}; stdout: {"gold": result, "predicted": result}, each result either
{"ok": true, "columns", "rows", "truncated"} or {"ok": false, "error"}. The database is built by
this script, then every query runs on a read-only connection (URI mode=ro) that an authorizer
restricts to reading, with a progress handler that interrupts it at its time limit."""
import json, math, sqlite3, sys, time

MAX_ROWS = 1000
ALLOWED = {
    getattr(sqlite3, "SQLITE_SELECT", 21),
    getattr(sqlite3, "SQLITE_READ", 20),
    getattr(sqlite3, "SQLITE_FUNCTION", 31),
    getattr(sqlite3, "SQLITE_RECURSIVE", 33),
}


def build(spec):
    con = sqlite3.connect("db.sqlite")
    for table in spec["tables"]:
        con.execute(table["ddl"])
        marks = ",".join("?" * len(table["columns"]))
        con.executemany(
            "INSERT INTO %s VALUES (%s)" % (table["name"], marks), table["rows"]
        )
    con.commit()
    con.close()


def cell(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "x'" + bytes(value).hex() + "'"
    return value


def run(sql, limit_ms):
    con = sqlite3.connect("file:db.sqlite?mode=ro", uri=True)
    deadline = time.monotonic() + limit_ms / 1000.0
    con.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 1000)
    con.set_authorizer(
        lambda action, *rest: sqlite3.SQLITE_OK if action in ALLOWED else sqlite3.SQLITE_DENY
    )
    try:
        cursor = con.execute(sql)
        if cursor.description is None:
            return {"ok": False, "error": "the statement returns no result set"}
        columns = [d[0] for d in cursor.description]
        rows = cursor.fetchmany(MAX_ROWS + 1)
    except Exception as err:
        message = str(err)
        if message == "interrupted":
            message = "interrupted: the query ran past its %d ms limit" % limit_ms
        return {"ok": False, "error": "%s: %s" % (type(err).__name__, message)}
    finally:
        con.set_progress_handler(None, 0)
    truncated = len(rows) > MAX_ROWS
    return {
        "ok": True,
        "columns": columns,
        "rows": [[cell(v) for v in row] for row in rows[:MAX_ROWS]],
        "truncated": truncated,
    }


def main():
    spec = json.loads(sys.stdin.read())
    build(spec)
    out = {"gold": run(spec["gold"], spec.get("gold_limit_ms", spec["limit_ms"]))}
    out["predicted"] = run(spec["predicted"], spec["limit_ms"])
    sys.stdout.write(json.dumps(out))


main()
