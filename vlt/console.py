"""What a person sees on the terminal: progress, a clean start, and a summary at the end of each command.

No torch, no Lightning: every tool imports this first. Three things live here:

- `progress(iterable, total=..., desc=...)`: tqdm's bar on a terminal; on a pipe (CI logs, Slurm logs) one
  status line every `VLT_PROGRESS_EVERY` seconds (default 20), so logs stay readable.
- `quiet_third_party()`: filters the known-harmless warnings and tips of our dependencies, each by name;
  every other warning still shows.
- `summary(title, ...)`: the closing block of a command: where its outputs are, its headline numbers,
  and what to run next.

`vlt -q ...` (or `VLT_QUIET=1`) silences progress and summaries; errors and warnings still print.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# (message regex, category name, why it is harmless here), filtered one by one.
HARMLESS_WARNINGS: list[tuple[str, type[Warning], str]] = [
    (r".*isinstance\(treespec, LeafSpec\)", FutureWarning, "lightning's own use of torch's pytree API"),
    (r".*LightningCLI's args parameter", UserWarning, "vlt passes argv to LightningCLI on purpose"),
    (r".*skip_none parameter was deprecated", Warning, "jsonargparse internals called by Lightning"),
    (r".*is smaller than the logging interval", UserWarning, "short tiny runs log less often than asked"),
    (
        r".*WeightAveraging callback with a model that overrides the configure_model",
        UserWarning,
        "vlt's configure_model only compiles blocks in place (`compile`); it never shards the model",
    ),
    (
        r".*module\(s\) in eval mode at the start of training",
        UserWarning,
        "frozen parts (the joint fine-tune's alignment target, feature nets) stay in eval mode by design",
    ),
]
# Log records (Lightning's info lines) that advertise services rather than report on the run.
HARMLESS_LOG_PREFIXES: tuple[str, ...] = ("💡 Tip:",)
# Lightning's hint to prefix `srun`: it applies only inside a Slurm allocation (where a plain `python`
# would run one task); on a machine that merely has Slurm installed it is noise.
SRUN_HINT = r".*The `srun` command is available on your system but is not used"


def quiet() -> bool:
    """True when the user asked for silence (`vlt -q`, `VLT_QUIET=1`)."""
    return os.environ.get("VLT_QUIET", "") not in ("", "0", "false", "False")


def is_terminal(stream: Any = None) -> bool:
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def interval() -> float:
    """Seconds between status lines on a pipe."""
    return float(os.environ.get("VLT_PROGRESS_EVERY", "20"))


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(HARMLESS_LOG_PREFIXES)


def quiet_third_party() -> None:
    """Install the named filters above (idempotent). Real warnings keep showing."""
    for message, category, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if "SLURM_JOB_ID" not in os.environ:
        warnings.filterwarnings("ignore", message=SRUN_HINT)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropTips) for f in handler.filters):
                handler.addFilter(_DropTips())


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def status_line(
    desc: str, done: int, total: int | None, elapsed: float, extra: str = "", rate: float | None = None
) -> str:
    """'desc 120/512 (23%) 3.1 it/s ETA 2m06s elapsed 40s extra': the one format of every status line.

    `rate` is the recent speed (default: the average since the start), which the ETA extrapolates."""
    if rate is None:
        rate = done / elapsed if elapsed > 0 else 0.0
    head = f"{desc} {done}/{total} ({100 * done / total:.0f}%)" if total else f"{desc} {done}"
    eta = f" ETA {duration((total - done) / rate)}" if total and rate > 0 and done < total else ""
    tail = f" {extra}" if extra else ""
    return f"{head} {rate:.2f} it/s{eta} elapsed {duration(elapsed)}{tail}"


class StatusLines:
    """A status line at most every `every` seconds (and at the end) to `stream`: progress on a pipe.

    The speed shown (and the ETA) is that since the previous line, so a slow start or a validation pause
    fades out of the estimate after one interval."""

    def __init__(
        self, desc: str, total: int | None, every: float | None = None, stream: Any = None, initial: int = 0
    ) -> None:
        self.desc, self.total = desc, total
        self.every = interval() if every is None else every
        self.stream = stream or sys.stdout
        self.start = self.last = time.monotonic()
        self.last_done = initial  # a resumed fit starts at its checkpoint's step

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def update(self, done: int, extra: str = "", *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            recent = (done - self.last_done) / (now - self.last) if now > self.last else 0.0
            self.last, self.last_done = now, done
            line = status_line(self.desc, done, self.total, now - self.start, extra, rate=recent)
            print(line, file=self.stream, flush=True)


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
    """Iterate with a progress display: tqdm on a terminal, status lines on a pipe, nothing when quiet."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if quiet():
        yield from iterable
        return
    if is_terminal():
        from tqdm import tqdm

        yield from tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)
        return
    lines = StatusLines(desc, total)
    done = 0
    for item in iterable:
        yield item
        done += 1
        lines.update(done)
    if lines.last_done != done:  # the last line, unless it was just printed
        lines.update(done, force=True)


def summary(
    title: str,
    *,
    where: str | Path | None = None,
    files: Sequence[str | Path] = (),
    numbers: Mapping[str, Any] | None = None,
    next_steps: Sequence[str] = (),
) -> str:
    """Print (unless quiet) and return the closing block of a command."""
    lines = [f"== {title} =="]
    if where is not None:
        lines.append(f"  run directory: {where}")
    shown = [str(f) for f in files][:12]
    if shown:
        lines.append(
            "  wrote: " + ", ".join(shown) + (f" (+{len(files) - 12} more)" if len(files) > 12 else "")
        )
    for name, value in (numbers or {}).items():
        lines.append(f"  {name}: {value:.4g}" if isinstance(value, float) else f"  {name}: {value}")
    lines += [f"  next: {step}" for step in next_steps]
    text = "\n".join(lines)
    if not quiet():
        print(text, flush=True)
    return text
