"""Who is in the synthetic dataset: patients, follow-up images, label sets, official-style split.

Label model (loosely the real ChestX-ray14, scaled so rare findings have enough
positives in a few thousand images):

* An image is "No Finding" with probability :data:`NO_FINDING_RATE` (0.5; real 0.538).
* Otherwise one *primary* finding is drawn, and every other finding joins it with
  probability ``alpha * P_real(other | primary)``, where ``P_real`` is the
  co-occurrence table :data:`REAL_COOCCURRENCE` measured on the real
  ``Data_Entry_2017_v2020.csv``. The primary weights and ``alpha`` are solved
  (:func:`label_model`) so each finding's prevalence equals
  :data:`TARGET_PREVALENCE` in expectation.
* A patient has 1-8 images (P(k) proportional to 0.6^k, mean about 2.3); each
  follow-up keeps the previous image's label set with probability 0.5, else
  draws a new one (this keeps the marginals unchanged).
* About 20 % of the patients (not images) form the test split.

Stated bounds (tested): over many images the No Finding rate is 0.5 +- 0.03 and
each finding's prevalence is within 20 % (+ 0.004) of its target: from
Infiltration 0.13 (most common), Effusion 0.10, Atelectasis 0.09, down to
Hernia 0.025 (rarest), so 3,000 images hold about 75 Hernia positives.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from cxrloc.labels import FINDINGS, NUM_FINDINGS

NO_FINDING_RATE = 0.5

#: Expected fraction of all images with each finding (real ChestX-ray14 in the comment).
TARGET_PREVALENCE: dict[str, float] = {
    "Atelectasis": 0.09,  # real 0.103
    "Cardiomegaly": 0.04,  # 0.025
    "Effusion": 0.10,  # 0.119
    "Infiltration": 0.13,  # 0.177
    "Mass": 0.045,  # 0.052
    "Nodule": 0.05,  # 0.057
    "Pneumonia": 0.035,  # 0.013
    "Pneumothorax": 0.045,  # 0.047
    "Consolidation": 0.04,  # 0.042
    "Edema": 0.035,  # 0.021
    "Emphysema": 0.035,  # 0.022
    "Fibrosis": 0.035,  # 0.015
    "Pleural_Thickening": 0.035,  # 0.030
    "Hernia": 0.025,  # 0.002
}

#: P(column finding | row finding) on the real Data_Entry_2017_v2020.csv (112,120 images), diagonal 0.
REAL_COOCCURRENCE = np.array([
    (0.00, 0.03, 0.28, 0.28, 0.06, 0.05, 0.02, 0.07, 0.11, 0.02, 0.04, 0.02, 0.04, 0.00),  # Atelectasis
    (0.13, 0.00, 0.38, 0.21, 0.04, 0.04, 0.01, 0.02, 0.06, 0.05, 0.02, 0.02, 0.04, 0.00),  # Cardiomegaly
    (0.25, 0.08, 0.00, 0.30, 0.09, 0.07, 0.02, 0.07, 0.10, 0.04, 0.03, 0.01, 0.06, 0.00),  # Effusion
    (0.16, 0.03, 0.20, 0.00, 0.06, 0.08, 0.03, 0.05, 0.06, 0.05, 0.02, 0.02, 0.04, 0.00),  # Infiltration
    (0.13, 0.02, 0.22, 0.20, 0.00, 0.16, 0.01, 0.07, 0.11, 0.02, 0.04, 0.02, 0.08, 0.00),  # Mass
    (0.09, 0.02, 0.14, 0.24, 0.14, 0.00, 0.01, 0.05, 0.07, 0.02, 0.02, 0.03, 0.06, 0.00),  # Nodule
    (0.18, 0.03, 0.19, 0.42, 0.05, 0.05, 0.00, 0.03, 0.09, 0.24, 0.02, 0.01, 0.03, 0.00),  # Pneumonia
    (0.15, 0.01, 0.19, 0.18, 0.08, 0.06, 0.01, 0.00, 0.04, 0.01, 0.14, 0.02, 0.05, 0.00),  # Pneumothorax
    (0.26, 0.04, 0.28, 0.26, 0.13, 0.09, 0.03, 0.05, 0.00, 0.03, 0.02, 0.02, 0.05, 0.00),  # Consolidation
    (0.10, 0.06, 0.26, 0.43, 0.06, 0.06, 0.15, 0.01, 0.07, 0.00, 0.01, 0.00, 0.03, 0.00),  # Edema
    (0.17, 0.02, 0.14, 0.18, 0.09, 0.05, 0.01, 0.30, 0.04, 0.01, 0.00, 0.01, 0.06, 0.00),  # Emphysema
    (0.13, 0.03, 0.11, 0.20, 0.07, 0.10, 0.01, 0.05, 0.05, 0.01, 0.02, 0.00, 0.10, 0.00),  # Fibrosis
    (0.15, 0.03, 0.25, 0.22, 0.13, 0.12, 0.01, 0.09, 0.07, 0.02, 0.04, 0.05, 0.00, 0.00),  # Pleural_Thickening
    (0.18, 0.03, 0.09, 0.15, 0.11, 0.04, 0.01, 0.04, 0.02, 0.01, 0.02, 0.04, 0.04, 0.00),  # Hernia
], dtype=np.float64)

MAX_FOLLOW_UPS = 8
FOLLOW_UP_DECAY = 0.6
KEEP_LABELS = 0.5
TEST_PATIENT_FRACTION = 0.2

# seed-sequence keys: every random stream is derived from (seed, key, ...) so workers agree
KEY_COHORT, KEY_SPLIT, KEY_BOXES, KEY_ANATOMY, KEY_FINDING, KEY_IMAGE = 11, 12, 13, 21, 22, 23


@dataclass(frozen=True)
class ImageJob:
    """Everything needed to render and list one image (deterministic given the dataset seed)."""

    index: int  # 0-based position in the dataset
    name: str  # PPPPPPPP_FFF.png
    patient: int  # 1-based patient id
    follow_up: int
    kinds: tuple[str, ...]  # planted findings, FINDINGS order; () = No Finding
    sex: str
    age: int
    view: str
    split: str  # "train_val" or "test"


@functools.cache
def label_model() -> tuple[float, np.ndarray]:
    """(alpha, primary weights (14,)) so that expected prevalences equal :data:`TARGET_PREVALENCE`.

    For an abnormal image, P(j) = w_j + sum_i w_i alpha C_ij, i.e. m / p = (I + alpha C^T) w,
    with sum(w) = 1 fixing alpha (found by bisection).
    """
    target = np.array([TARGET_PREVALENCE[f] for f in FINDINGS]) / (1.0 - NO_FINDING_RATE)

    def weights(alpha: float) -> np.ndarray:
        return np.linalg.solve(np.eye(NUM_FINDINGS) + alpha * REAL_COOCCURRENCE.T, target)

    lo, hi = 0.0, 3.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if weights(mid).sum() > 1.0:
            lo = mid
        else:
            hi = mid
    w = weights(0.5 * (lo + hi))
    if (w < 0).any():  # pragma: no cover - guarded by a test on the shipped targets
        raise ValueError("target prevalences are inconsistent with the co-occurrence table")
    return 0.5 * (lo + hi), w / w.sum()


def sample_label_set(rng: np.random.Generator) -> tuple[str, ...]:
    """One image's label set (FINDINGS order), () for No Finding."""
    if rng.random() < NO_FINDING_RATE:
        return ()
    alpha, w = label_model()
    primary = int(rng.choice(NUM_FINDINGS, p=w))
    joins = rng.random(NUM_FINDINGS) < alpha * REAL_COOCCURRENCE[primary]
    joins[primary] = True
    return tuple(FINDINGS[i] for i in np.flatnonzero(joins))


def plan_cohort(n_images: int, seed: int) -> list[ImageJob]:
    """Patients, follow-ups, labels and split for ``n_images`` images (deterministic in ``seed``)."""
    if n_images < 1:
        raise ValueError(f"number of images must be >= 1, got {n_images}")
    rng = np.random.default_rng([seed, KEY_COHORT])
    k = np.arange(1, MAX_FOLLOW_UPS + 1)
    p_count = FOLLOW_UP_DECAY ** (k - 1)
    p_count /= p_count.sum()
    rows = []  # (patient, follow_up, kinds, sex, age, view)
    patient = 0
    while len(rows) < n_images:
        patient += 1
        count = min(int(rng.choice(k, p=p_count)), n_images - len(rows))
        sex = "M" if rng.random() < 0.56 else "F"
        age = int(np.clip(rng.normal(47, 16), 1, 94))
        kinds: tuple[str, ...] = ()
        for fu in range(count):
            if fu == 0 or rng.random() >= KEEP_LABELS:
                kinds = sample_label_set(rng)
            age += int(rng.random() < 0.3)
            view = "PA" if rng.random() < 0.6 else "AP"
            rows.append((patient, fu, kinds, sex, min(age, 95), view))
    n_patients = patient
    order = np.random.default_rng([seed, KEY_SPLIT]).permutation(n_patients) + 1
    n_test = int(round(TEST_PATIENT_FRACTION * n_patients)) if n_patients > 1 else 0
    test_patients = set(order[:n_test].tolist())
    return [
        ImageJob(index=i, name=f"{p:08d}_{fu:03d}.png", patient=p, follow_up=fu, kinds=kinds, sex=sex, age=age,
                 view=view, split="test" if p in test_patients else "train_val")
        for i, (p, fu, kinds, sex, age, view) in enumerate(rows)
    ]


def label_matrix(jobs: list[ImageJob]) -> np.ndarray:
    """(N, 14) uint8 multi-hot labels of the jobs, FINDINGS order."""
    out = np.zeros((len(jobs), NUM_FINDINGS), dtype=np.uint8)
    index = {f: i for i, f in enumerate(FINDINGS)}
    for row, job in enumerate(jobs):
        for kind in job.kinds:
            out[row, index[kind]] = 1
    return out
