"""Validation report: every problem found in a dataset folder, grouped by kind, each naming its file/row.

Kinds are counted exactly; only the first ``keep`` messages of each kind are stored
(the real sample lists 112,120 images of which 10 are on disk, so "listed but
absent" is reported as a count plus a capped list, not 112k lines).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

#: problem kind -> what it means (the order is the order of the summary).
PROBLEM_KINDS: dict[str, str] = {
    "missing_file": "a metadata file (CSV / split list) was not found",
    "malformed_row": "a CSV row or list line that cannot be parsed",
    "unknown_label": "a label that is not one of the 14 findings (nor 'No Finding')",
    "duplicate_name": "an image name listed twice, or found at several paths",
    "listed_absent": "listed in Data_Entry but no image file found",
    "unlisted_image": "image file present but not listed in Data_Entry",
    "split_missing": "in Data_Entry but in neither split list",
    "split_unknown": "in a split list but not in Data_Entry",
    "split_conflict": "in both train_val_list and test_list",
    "patient_overlap": "a patient with images in both train_val and test lists",
    "box_unknown_image": "a box for an image not in Data_Entry",
    "bad_image": "an image file that could not be decoded (skipped)",
}


class DatasetValidationError(ValueError):
    """The dataset folder has problems and strict mode is on; the message lists them."""


class ValidationReport:
    """Problems found while reading a dataset folder or preparing a cache.

    Args:
        keep: messages stored per kind (counts are always exact).
    """

    def __init__(self, keep: int = 200):
        self.keep = keep
        self.counts: dict[str, int] = defaultdict(int)
        self.messages: dict[str, list[str]] = defaultdict(list)
        self.notes: list[str] = []
        self.stats: dict[str, Any] = {}

    def add(self, kind: str, message: str) -> None:
        """Record one problem of ``kind`` (a key of :data:`PROBLEM_KINDS`); ``message`` names file/row."""
        if kind not in PROBLEM_KINDS:
            raise ValueError(f"unknown problem kind {kind!r}")
        self.counts[kind] += 1
        if len(self.messages[kind]) < self.keep:
            self.messages[kind].append(message)

    def note(self, message: str) -> None:
        """Record something informative that is not a problem (e.g. which Data_Entry file was used)."""
        self.notes.append(message)

    def count(self, kind: str | None = None) -> int:
        """Number of problems of one kind, or of all kinds."""
        return self.counts.get(kind, 0) if kind else sum(self.counts.values())

    @property
    def ok(self) -> bool:
        return self.count() == 0

    def summary(self, per_kind: int = 10) -> str:
        """Human-readable multi-line summary: per kind its count and the first ``per_kind`` messages."""
        if self.ok:
            return "no problems found"
        lines = [f"{self.count():,} problem(s) found:"]
        for kind, meaning in PROBLEM_KINDS.items():
            n = self.counts.get(kind, 0)
            if not n:
                continue
            lines.append(f"  {kind} ({meaning}): {n:,}")
            shown = self.messages[kind][:per_kind]
            lines.extend(f"    - {msg}" for msg in shown)
            if n > len(shown):
                lines.append(f"    ... and {n - len(shown):,} more")
        return "\n".join(lines)

    def to_dict(self, per_kind: int = 50) -> dict[str, Any]:
        """JSON-ready dict: ``ok``, per kind ``count``/``meaning``/``examples`` (capped), notes, stats."""
        return {
            "ok": self.ok,
            "total_problems": self.count(),
            "problems": {
                kind: {"count": self.counts[kind], "meaning": meaning, "examples": self.messages[kind][:per_kind]}
                for kind, meaning in PROBLEM_KINDS.items()
                if self.counts.get(kind)
            },
            "notes": list(self.notes),
            "stats": dict(self.stats),
        }

    def raise_if_problems(self, hint: str = "rerun with --lenient to proceed with what is usable") -> None:
        """Strict mode: raise :class:`DatasetValidationError` with the summary when there is any problem."""
        if not self.ok:
            raise DatasetValidationError(f"{self.summary()}\n{hint}")
