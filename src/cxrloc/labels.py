"""The 14 ChestX-ray14 findings in the paper's order (Table 1): the single source of truth.

"No Finding" is the empty label set, not a class. Boxes exist for the first 8
findings; the official ``BBox_List_2017.csv`` spells Infiltration as ``Infiltrate``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_FINDINGS = len(FINDINGS)
BOX_FINDINGS: tuple[str, ...] = FINDINGS[:8]
NO_FINDING = "No Finding"
FINDING_INDEX: dict[str, int] = {name: i for i, name in enumerate(FINDINGS)}

#: Alternative spellings seen in the official files, mapped to the canonical name.
ALIASES: dict[str, str] = {"Infiltrate": "Infiltration"}

#: Short names used in the paper's tables.
SHORT_NAMES: dict[str, str] = {
    "Atelectasis": "Atel",
    "Cardiomegaly": "Card",
    "Effusion": "Effu",
    "Infiltration": "Infi",
    "Mass": "Mass",
    "Nodule": "Nodu",
    "Pneumonia": "Pne1",
    "Pneumothorax": "Pnt2",
    "Consolidation": "Cons",
    "Edema": "Edem",
    "Emphysema": "Emph",
    "Fibrosis": "Fibr",
    "Pleural_Thickening": "PlTh",
    "Hernia": "Hern",
}


class UnknownLabelError(ValueError):
    """A label string that is not one of the 14 findings (nor "No Finding")."""


def canonical(name: str) -> str:
    """Return the canonical finding name for ``name`` (handles ``Infiltrate``).

    Raises:
        UnknownLabelError: if ``name`` is not a known finding.
    """
    name = name.strip()
    name = ALIASES.get(name, name)
    if name not in FINDING_INDEX:
        raise UnknownLabelError(f"unknown finding {name!r}; expected one of {', '.join(FINDINGS)}")
    return name


def encode(labels: str | Iterable[str]) -> np.ndarray:
    """Multi-hot vector (14,) uint8 in :data:`FINDINGS` order.

    Args:
        labels: a ``|``-separated string as in ``Data_Entry_2017.csv`` (e.g.
            ``"Effusion|Mass"``, ``"No Finding"``) or an iterable of names.

    Raises:
        UnknownLabelError: for a name that is neither a finding nor "No Finding",
            or "No Finding" combined with a finding.
    """
    parts = [p.strip() for p in labels.split("|")] if isinstance(labels, str) else [p.strip() for p in labels]
    parts = [p for p in parts if p]
    out = np.zeros(NUM_FINDINGS, dtype=np.uint8)
    if parts == [NO_FINDING] or not parts:
        return out
    for p in parts:
        if p == NO_FINDING:
            raise UnknownLabelError(f"'No Finding' combined with findings in {labels!r}")
        out[FINDING_INDEX[canonical(p)]] = 1
    return out


def decode(vector: np.ndarray) -> str:
    """Inverse of :func:`encode`: ``"A|B"`` in paper order or ``"No Finding"``."""
    names = [FINDINGS[i] for i in np.flatnonzero(np.asarray(vector) > 0)]
    return "|".join(names) if names else NO_FINDING
