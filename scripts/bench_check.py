#!/usr/bin/python3
"""scripts/bench_check.py — compares a bench.json with committed thresholds.

    bench_check.py BENCH_JSON THRESHOLDS_JSON [--name NAME]

BENCH_JSON is what ``python-demo/bench.py`` writes (build/bench/bench.json, or bench-quick.json for
``--quick``): sections such as "ratios", "throughput_gbps" and "latencies_us", each a flat object of
metric name -> number.

THRESHOLDS_JSON (python-demo/bench_thresholds.json, bench_thresholds_quick.json) has the same
sections; each metric it names carries exactly one bound and a reason:

    {
      "about": "free text (optional; keys starting with '_' are ignored too)",
      "ratios": {
        "retrieve_hnd_vs_parallel_memcpy_median": {
          "min": 0.4,                       # or "max": N, for latencies
          "reason": "one line: why this bound",
          "target": 0.9,                    # optional: the goal, when it differs from the bound
          "met": false                      # optional: whether the goal is reached today
        }
      },
      "latencies_us": {"lookup_xxh3_raw_median": {"max": 8.0, "reason": "..."}}
    }

Prints one line per metric: "ok" or "FAIL", the metric, its value, the bound (and the target when one
is given); a metric missing from BENCH_JSON fails. Last line: "NAME: N passed, M failed" (NAME
defaults to "bench"). Exit status: 0 when every metric is within its bound, 1 when one is not, 2 when
a file cannot be read or the thresholds file is malformed (nothing is checked then).

Standard library only; the functions below are what interop-tests/python/test_bench_check.py tests.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

INFO_KEYS = ("about",)
SPEC_KEYS = {"min", "max", "reason", "target", "met"}


class ThresholdsError(ValueError):
    """The thresholds file is not in the documented form."""


@dataclass(frozen=True)
class Threshold:
    section: str
    name: str
    bound: str  # "min" or "max"
    limit: float
    reason: str
    target: float | None = None
    met: bool | None = None

    @property
    def metric(self) -> str:
        return f"{self.section}.{self.name}"


@dataclass(frozen=True)
class Outcome:
    threshold: Threshold
    value: float | None  # None: missing or not a number
    passed: bool
    note: str = ""

    def line(self) -> str:
        t = self.threshold
        op = ">=" if t.bound == "min" else "<="
        status = "ok" if self.passed else "FAIL"
        value = "-" if self.value is None else f"{self.value:.3g}"
        text = f"{status:<5}{t.metric:<52}{value:>10}  {op} {t.limit:g}"
        if t.target is not None:
            text += f"  (target {t.target:g}{'' if t.met is None else ', met' if t.met else ', not met'})"
        if self.note:
            text += f"  {self.note}"
        if not self.passed:
            text += f"  [{t.reason}]"
        return text


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_thresholds(document) -> list[Threshold]:
    """The thresholds of a parsed thresholds file; ThresholdsError when it is malformed."""
    if not isinstance(document, dict):
        raise ThresholdsError("the top level must be an object of sections")
    thresholds = []
    for section, metrics in document.items():
        if section in INFO_KEYS or section.startswith("_"):
            continue
        if not isinstance(metrics, dict):
            raise ThresholdsError(f"section '{section}' must be an object of metric -> threshold")
        for name, spec in metrics.items():
            where = f"{section}.{name}"
            if not isinstance(spec, dict):
                raise ThresholdsError(f"{where}: a threshold must be an object")
            unknown = set(spec) - SPEC_KEYS
            if unknown:
                raise ThresholdsError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(SPEC_KEYS)})")
            bounds = [key for key in ("min", "max") if key in spec]
            if len(bounds) != 1:
                raise ThresholdsError(f"{where}: needs exactly one of 'min' and 'max'")
            bound = bounds[0]
            if not _is_number(spec[bound]):
                raise ThresholdsError(f"{where}: '{bound}' must be a finite number")
            reason = spec.get("reason")
            if not isinstance(reason, str) or not reason.strip():
                raise ThresholdsError(f"{where}: 'reason' must be a non-empty string")
            target = spec.get("target")
            if target is not None and not _is_number(target):
                raise ThresholdsError(f"{where}: 'target' must be a finite number")
            met = spec.get("met")
            if met is not None and not isinstance(met, bool):
                raise ThresholdsError(f"{where}: 'met' must be true or false")
            if met is not None and target is None:
                raise ThresholdsError(f"{where}: 'met' without 'target'")
            thresholds.append(Threshold(section, name, bound, float(spec[bound]), reason.strip(),
                                        None if target is None else float(target), met))
    if not thresholds:
        raise ThresholdsError("no thresholds")
    return thresholds


def load_thresholds(path: str) -> list[Threshold]:
    try:
        with open(path) as file:
            document = json.load(file)
    except json.JSONDecodeError as error:
        raise ThresholdsError(f"not valid JSON: {error}") from error
    return parse_thresholds(document)


def check(results: dict, thresholds: list[Threshold]) -> list[Outcome]:
    """One outcome per threshold, in the order of the thresholds."""
    outcomes = []
    for t in thresholds:
        section = results.get(t.section)
        value = section.get(t.name) if isinstance(section, dict) else None
        if value is None:
            outcomes.append(Outcome(t, None, False, "missing from bench.json"))
            continue
        if not _is_number(value):
            outcomes.append(Outcome(t, None, False, f"not a finite number: {value!r}"))
            continue
        value = float(value)
        passed = value >= t.limit if t.bound == "min" else value <= t.limit
        note = ""
        if t.met is False and t.target is not None:
            reached = value >= t.target if t.bound == "min" else value <= t.target
            if reached:
                note = "target reached in this run: tighten the bound and set met true?"
        outcomes.append(Outcome(t, value, passed, note))
    return outcomes


def report(outcomes: list[Outcome], name: str = "bench", out=None) -> int:
    """Prints the lines and the summary (to ``out``, default stdout); returns the exit status (0 or 1)."""
    out = out or sys.stdout
    for outcome in outcomes:
        print(outcome.line(), file=out)
    failed = sum(not o.passed for o in outcomes)
    print(f"{name}: {len(outcomes) - failed} passed, {failed} failed", file=out, flush=True)
    return 1 if failed else 0


def run(bench_path: str, thresholds_path: str, name: str = "bench", out=None, err=None) -> int:
    """Loads both files and checks; returns the exit status (0, 1, or 2 when a file is unusable)."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        thresholds = load_thresholds(thresholds_path)
    except (OSError, ThresholdsError) as error:
        print(f"bench_check: {thresholds_path}: {error}", file=err)
        return 2
    try:
        with open(bench_path) as file:
            results = json.load(file)
        if not isinstance(results, dict):
            raise ValueError("the top level must be an object")
    except (OSError, ValueError) as error:
        print(f"bench_check: {bench_path}: {error}", file=err)
        return 2
    print(f"check of {bench_path} against {thresholds_path}:", file=out)
    return report(check(results, thresholds), name, out)


def main(argv: list[str]) -> int:
    args = list(argv[1:])
    name = "bench"
    if "--name" in args:
        index = args.index("--name")
        if index + 1 >= len(args):
            print(__doc__, file=sys.stderr)
            return 2
        name = args[index + 1]
        del args[index:index + 2]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    return run(args[0], args[1], name)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
