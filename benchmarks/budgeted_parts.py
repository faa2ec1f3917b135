"""Parts that each run within a time budget, for a benchmark that must end on its own and keep
every number it measured (`gpu_check.py`, made for a GPU lent for a few minutes).

A part is a function that writes what it measures into its record as it goes (`Part.step`).
`Report.run` gives it a budget and runs it:

- a part that runs out of time is *cut*: a SIGALRM at its deadline raises `Cut` inside it (in
  the main thread; elsewhere only the overall bookkeeping applies), its record keeps the steps
  it finished, and the next part runs;
- a part that raises is recorded as an *error* (one line and the end of the traceback), and the
  next part runs;
- `NotAvailable` and `Skipped` mark a part that cannot or need not run;
- the JSON document is rewritten atomically after every part and every finished step, so a run
  that is killed keeps what it measured.

Budgets: each part has a share of the whole budget; time an earlier part left unused is added
to the next part's budget, and no part is given more than what is left of the whole budget (a
part given nothing is cut before it starts); `overrides` set a part's budget in seconds.
"""

from __future__ import annotations

import math
import signal
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from et_circuits.core.io import write_json

STATUSES = ("done", "cut", "error", "not available", "skipped")


class Cut(BaseException):
    """A part ran out of its budget. A BaseException, so that no `except Exception` on the way
    swallows it."""


class NotAvailable(Exception):
    """The part cannot run here (e.g. a method that does not exist yet); the message says why."""


class Skipped(Exception):
    """The part was not asked for, or what it needs did not finish; the message says which."""


@contextmanager
def deadline(seconds: float):
    """Raise `Cut` inside the block once `seconds` have passed (SIGALRM; only in the main
    thread of a POSIX process: elsewhere the block runs to its end). A block given no time is
    cut before it starts."""
    if seconds <= 0:
        raise Cut()
    armed = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    previous = None
    if armed:

        def on_alarm(signum, frame):
            raise Cut()

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def json_safe(value):
    """`value` with NaN and infinities as None and tuples as lists, so the file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def one_line(error: BaseException, limit: int = 400) -> str:
    """`Type: first line of the message`, at most `limit` characters."""
    text = str(error).strip().splitlines()
    line = f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return line[:limit]


class Part:
    """The running part's view of its record: `step` stores one finished measurement under its
    name and saves the document; `set` stores values; `left` is the time to its deadline."""

    def __init__(self, report: Report, record: dict, ends_at: float):
        self.report, self.record, self.ends_at = report, record, ends_at

    def step(self, name: str, value) -> None:
        self.record.setdefault("steps", {})[name] = value
        self.record["finished"].append(name)
        self.report.save()

    def set(self, **values) -> None:
        self.record.update(values)

    def left(self) -> float:
        return self.ends_at - time.perf_counter()


class Report:
    """One run's JSON document at `path`: `header` fields, then one section per group of parts
    (`run(section, name, ...)` fills `doc[section][name]`), then the summary (`close`).
    `total` seconds are shared out over the parts by `share`. `cleanup()` runs after every part
    (e.g. free GPU memory); `meter` (optional) has `start()` and `stop() -> dict` of what it
    measured over a part (e.g. peak GPU memory), merged into the part's record."""

    def __init__(self, path: str | Path, header: dict, total: float, *, cleanup=None, meter=None, overrides=None):
        self.path, self.total = Path(path), total
        self.doc = {**header, "budget_s": total, "finished": False}
        self.cleanup, self.meter = cleanup, meter
        self.overrides = dict(overrides or {})
        self.planned = 0.0  # the shares of the parts run so far, in seconds
        self.used = 0.0  # the seconds those parts took
        self.started = time.perf_counter()
        self.order: list[tuple[str, str]] = []

    def save(self) -> None:
        self.doc["wall_s"] = round(time.perf_counter() - self.started, 2)
        write_json(self.path, json_safe(self.doc))

    def budget(self, key: str, share: float) -> float:
        """This part's seconds: its share plus what earlier parts left unused, within what is
        left of the whole budget; or its override."""
        planned = share * self.total
        slack = max(0.0, self.planned - self.used)
        self.planned += planned
        return self.overrides.get(key, max(0.0, min(planned + slack, self.total - self.used)))

    def run(
        self, section: str, name: str, share: float, fn: Callable[[Part], None], *, skip: str | None = None
    ) -> dict:
        """Run `fn(part)` within its budget and record how it ended (see the module doc).
        `skip`: a reason not to run it at all (recorded as skipped)."""
        key = name if section == name else f"{section}.{name}"
        budget = self.budget(key, share)
        record = {"status": "running", "budget_s": round(budget, 3), "seconds": None, "finished": []}
        if section == name:
            self.doc[section] = record
        else:
            self.doc.setdefault(section, {})[name] = record
        self.order.append((section, name))
        if skip:  # nothing runs: no cleanup, no meter
            record.update(status="skipped", reason=skip, seconds=0.0)
            self.save()
            return record
        self.save()
        start = time.perf_counter()
        if self.meter is not None:
            self.meter.start()
        try:
            with deadline(budget):
                fn(Part(self, record, start + budget))
            record["status"] = "done"
        except Cut:
            record["status"] = "cut"
        except NotAvailable as e:
            record["status"], record["reason"] = "not available", str(e)
        except Skipped as e:
            record["status"], record["reason"] = "skipped", str(e)
        except KeyboardInterrupt:
            record["status"] = "interrupted"
            self._close_part(record, start)
            raise
        except Exception as e:  # noqa: BLE001 (every failure is recorded; the next part runs)
            record["status"], record["error"] = "error", one_line(e)
            record["traceback"] = traceback.format_exc(limit=-8).splitlines()[-24:]
        self._close_part(record, start)
        return record

    def _close_part(self, record: dict, start: float) -> None:
        if self.cleanup is not None:
            try:
                self.cleanup()
            except Exception as e:  # noqa: BLE001
                record["cleanup_error"] = one_line(e)
        if self.meter is not None:
            try:
                record.update(self.meter.stop())
            except Exception as e:  # noqa: BLE001
                record["meter_error"] = one_line(e)
        seconds = time.perf_counter() - start
        record["seconds"] = round(seconds, 3)
        self.used += seconds
        self.save()

    def records(self) -> list[tuple[str, dict]]:
        """(part key, record) of every part run, in order."""
        out = []
        for section, name in self.order:
            if section == name:
                out.append((section, self.doc[section]))
            else:
                out.append((f"{section}.{name}", self.doc[section][name]))
        return out

    def close(self, summary: list[dict]) -> None:
        self.doc["summary"] = summary
        self.doc["finished"] = True
        self.save()


def summary_rows(report: Report) -> list[dict]:
    """One row per part: its key, status, seconds / budget, check (pass / FAIL / -) and the
    headline the part set (or its error, or why it did not run)."""
    rows = []
    for key, r in report.records():
        check = {True: "pass", False: "FAIL"}.get(r.get("pass"), "-")
        what = r.get("headline") or r.get("error") or r.get("reason") or ""
        if r["status"] == "cut":
            what = f"cut after {', '.join(r['finished']) or 'nothing'}" + (f"; {what}" if what else "")
        if r.get("peak_gib") is not None:
            what += f" [peak {r['peak_gib']:.1f} GiB]"
        rows.append(
            {
                "part": key,
                "status": r["status"],
                "seconds": r["seconds"],
                "budget_s": r["budget_s"],
                "check": check,
                "result": what,
            }
        )
    return rows


def _seconds(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def format_table(rows: list[dict]) -> str:
    """The summary rows as an aligned text table."""
    head = ("part", "status", "s / budget", "check", "result")
    lines = [
        (
            r["part"],
            r["status"],
            f"{_seconds(r['seconds'])} / {r['budget_s']:.1f}",
            r["check"],
            r["result"],
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)][:-1]
    fmt = "  ".join(f"{{:{w}}}" for w in widths) + "  {}"
    return "\n".join(fmt.format(*map(str, line)).rstrip() for line in [head, *lines])
