#!/usr/bin/env python3
"""scripts/summary.py — counts test reports and prints the summary of `./build.sh test`.

    summary.py trx FILE...            "passed failed files" summed over trx files
    summary.py junit FILE             "passed failed" of a JUnit XML file
    summary.py line NAME LOG          "passed failed" from LOG's last "NAME: N passed, M failed" line
                                      ("0 0" when there is none)
    summary.py dotnet LOG             "failed passed" summed over dotnet test's console lines
                                      ("Passed!/Failed! - Failed: n, Passed: n, …", one per project)
    summary.py add TSV NAME PASSED FAILED RC [NOTE]
                                      records one suite in TSV (a non-zero RC with no failed test
                                      counts as 1 failed)
    summary.py totals TSV             "passed failed" over the suites recorded in TSV
    summary.py report TSV [TIMING...] prints the summary: one line per suite, the timings, and last
                                      "N passed, M failed"; exit status 1 when something failed

Run with Debian's /usr/bin/python3 (standard library only).
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def count_trx(paths: list[str]) -> str:
    passed = failed = files = 0
    for path in paths:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError):
            failed += 1
            continue
        files += 1
        for c in root.iter():
            if c.tag.endswith("Counters"):
                n = lambda k: int(c.get(k, "0"))  # noqa: E731
                passed += n("passed")
                failed += n("failed") + n("error") + n("timeout") + n("aborted")
    return f"{passed} {failed} {files}"


def count_junit(path: str) -> str:
    # tests - failures - errors - skipped; errors fail
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
    passed = failed = 0
    for s in suites:
        n = lambda k: int(s.get(k, "0"))  # noqa: E731
        passed += n("tests") - n("failures") - n("errors") - n("skipped")
        failed += n("failures") + n("errors")
    return f"{passed} {failed}"


def count_line(name: str, log: str) -> str:
    pattern = re.compile(rf"^{re.escape(name)}: ([0-9]+) passed, ([0-9]+) failed$")
    found = "0 0"
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            found = f"{m.group(1)} {m.group(2)}"
    return found


def count_dotnet(log: str) -> str:
    failed = passed = 0
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return "0 0"
    for m in re.finditer(r"(?:Passed|Failed)! +- Failed: +([0-9]+), Passed: +([0-9]+)", text):
        failed += int(m.group(1))
        passed += int(m.group(2))
    return f"{failed} {passed}"


def read_suites(tsv: str) -> list[tuple[str, int, int, str]]:
    rows = []
    try:
        lines = Path(tsv).read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        name, passed, failed, note = (line.split("\t") + [""] * 4)[:4]
        rows.append((name, int(passed), int(failed), note))
    return rows


def add(tsv: str, name: str, passed: str, failed: str, rc: str, note: str = "") -> None:
    p, f, code = int(passed or 0), int(failed or 0), int(rc or 0)
    if code != 0 and f == 0:
        f = 1
        note = (note + "; " if note else "") + f"exit status {code} without a failed test: counted as 1 failed"
    with open(tsv, "a") as out:
        out.write(f"{name}\t{p}\t{f}\t{note}\n")


def totals(tsv: str) -> tuple[int, int]:
    rows = read_suites(tsv)
    return sum(r[1] for r in rows), sum(r[2] for r in rows)


def report(tsv: str, timings: list[str]) -> int:
    rows = read_suites(tsv)
    print("\n==> summary")
    for name, passed, failed, note in rows:
        print("  " + f"{name:<10} {passed:5d} passed, {failed:3d} failed" + (f"  ({note})" if note else ""))
    print("  timings:")
    for t in timings:
        print(f"    {t}")
    passed, failed = totals(tsv)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "trx":
        print(count_trx(args))
    elif cmd == "junit" and len(args) == 1:
        print(count_junit(args[0]))
    elif cmd == "line" and len(args) == 2:
        print(count_line(*args))
    elif cmd == "dotnet" and len(args) == 1:
        print(count_dotnet(args[0]))
    elif cmd == "add" and len(args) in (5, 6):
        add(*args)
    elif cmd == "totals" and len(args) == 1:
        print(*totals(args[0]))
    elif cmd == "report" and len(args) >= 1:
        return report(args[0], args[1:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
