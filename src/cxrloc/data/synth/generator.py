"""Write a synthetic dataset folder in the ChestX-ray14 layout (``cxrloc synth``).

Output folder ``D``::

    D/images/PPPPPPPP_FFF.png     8-bit grey phantoms, S x S
    D/Data_Entry_2017.csv         labels, patients, follow-ups (official columns)
    D/BBox_List_2017.csv          boxes of the 8 box findings on a subset of test images
    D/synth_truth_boxes.csv       the true box of every planted finding (all images)
    D/train_val_list.txt, D/test_list.txt   patient-disjoint, about 80/20 by patient
    D/synth_meta.json             arguments, counts, prevalence (no timestamps)

Deterministic: every random stream is derived from ``(seed, key, patient or image
index)`` (:mod:`.cohort`), so the same arguments give byte-identical files with
any number of workers.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cxrloc import __version__
from cxrloc.data.synth import writer
from cxrloc.data.synth.anatomy import Phantom, sample_acquisition, sample_anatomy
from cxrloc.data.synth.cohort import (
    KEY_ANATOMY,
    KEY_BOXES,
    KEY_FINDING,
    KEY_IMAGE,
    TARGET_PREVALENCE,
    ImageJob,
    label_matrix,
    plan_cohort,
)
from cxrloc.data.synth.findings import DIFFICULTIES, Difficulty, Finding, sample_finding
from cxrloc.data.synth.render import Box, render
from cxrloc.fileio import atomic_write_json, atomic_write_text
from cxrloc.labels import BOX_FINDINGS, FINDING_INDEX, FINDINGS
from cxrloc.malloc import tune_cpu_malloc

log = logging.getLogger(__name__)

MIN_SIZE = 64
DEFAULT_BBOX_FRACTION = 0.5
_OUR_FILES = (writer.DATA_ENTRY_NAME, writer.BBOX_NAME, writer.TRUTH_NAME, writer.META_NAME,
              writer.TRAIN_VAL_NAME, writer.TEST_NAME)


@dataclass
class SynthResult:
    """What :func:`generate_dataset` wrote."""

    root: Path
    jobs: list[ImageJob]
    boxes: list[dict[str, Box]]  # per image: finding -> true box
    bbox_rows: int
    seconds: float


def get_difficulty(name: str | Difficulty) -> Difficulty:
    if isinstance(name, Difficulty):
        return name
    if name not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {name!r}; choose one of {', '.join(DIFFICULTIES)}")
    return DIFFICULTIES[name]


def phantom_for(job: ImageJob, seed: int, difficulty: str | Difficulty = "medium") -> tuple[Phantom, list[Finding]]:
    """The phantom and planted findings of one dataset image (what the generator renders).

    Anatomy comes from (seed, patient), so follow-ups show the same body; a
    finding's place and size from (seed, patient, finding), so a patient's nodule
    stays where it was; pose, exposure, noise and a +-8 % jitter of each finding
    from (seed, image index).
    """
    diff = get_difficulty(difficulty)
    anatomy = sample_anatomy(np.random.default_rng([seed, KEY_ANATOMY, job.patient]), job.sex)
    rng = np.random.default_rng([seed, KEY_IMAGE, job.index])
    acquisition = dataclasses.replace(sample_acquisition(rng, diff.noise), view=job.view)
    findings = []
    for kind in job.kinds:
        f = sample_finding(kind, anatomy, np.random.default_rng([seed, KEY_FINDING, job.patient, FINDING_INDEX[kind]]), diff)
        size, strength = rng.uniform(0.92, 1.08, size=2)
        findings.append(dataclasses.replace(f, rx=f.rx * size, ry=f.ry * size, strength=f.strength * strength))
    return Phantom(anatomy, acquisition), findings


def render_job(job: ImageJob, size: int, seed: int, difficulty: str | Difficulty = "medium") -> tuple[np.ndarray, dict[str, Box]]:
    """Render one dataset image: ((S, S) uint8, finding -> true box)."""
    phantom, findings = phantom_for(job, seed, difficulty)
    out = render(phantom, findings, size)
    return out.image, out.boxes


def _render_chunk(task: tuple[Sequence[ImageJob], int, int, str, str]) -> list[dict[str, Box]]:
    jobs, size, seed, difficulty, images_dir = task
    tune_cpu_malloc()  # the renderer's image-sized temporaries reuse freed memory (about 1.5x faster)
    folder = Path(images_dir)
    results = []
    for job in jobs:
        image, boxes = render_job(job, size, seed, difficulty)
        writer.write_file_atomic(folder / job.name, writer.encode_png_gray(image))
        results.append(boxes)
    return results


def _prepare_folder(root: Path, overwrite: bool) -> Path:
    images = root / writer.IMAGES_DIR
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root}: exists and is not a folder")
    existing = [p for p in root.iterdir()] if root.exists() else []
    if existing and not overwrite:
        raise ValueError(f"{root}: folder is not empty; pass --overwrite to replace a previous synthetic dataset there")
    if overwrite and existing:
        if not (root / writer.META_NAME).exists():
            raise ValueError(f"{root}: not a synthetic dataset (no {writer.META_NAME}); refusing to overwrite it")
        for name in _OUR_FILES:
            (root / name).unlink(missing_ok=True)
        if images.is_dir():
            for p in images.glob("*.png"):
                p.unlink()
    images.mkdir(parents=True, exist_ok=True)
    return images


def generate_dataset(
    out: str | Path,
    n_images: int,
    size: int = 256,
    seed: int = 0,
    difficulty: str = "medium",
    workers: int = 1,
    bbox_fraction: float = DEFAULT_BBOX_FRACTION,
    overwrite: bool = False,
    progress: bool = True,
    chunk_size: int = 32,
) -> SynthResult:
    """Write a synthetic ChestX-ray14-layout dataset to ``out`` (see the module docstring).

    Args:
        out: dataset folder (created; must be empty unless ``overwrite``).
        n_images: number of images.
        size: side of the square images, pixels (>= 64).
        seed: dataset seed; same arguments -> byte-identical files.
        difficulty: "easy", "medium" (default) or "hard".
        workers: rendering processes (1 = in this process).
        bbox_fraction: fraction of test images with a box finding listed in BBox_List.
        overwrite: replace a previous synthetic dataset in ``out``.
        progress: show a tqdm progress bar.
    """
    diff = get_difficulty(difficulty)
    if size < MIN_SIZE:
        raise ValueError(f"image size must be >= {MIN_SIZE}, got {size}")
    if not 0.0 <= bbox_fraction <= 1.0:
        raise ValueError(f"bbox fraction must be in [0, 1], got {bbox_fraction}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(out)
    t0 = time.perf_counter()
    jobs = plan_cohort(n_images, seed)
    images_dir = _prepare_folder(root, overwrite)
    chunks = [jobs[i:i + chunk_size] for i in range(0, len(jobs), chunk_size)]
    tasks = [(c, size, seed, diff.name, str(images_dir)) for c in chunks]
    boxes: list[dict[str, Box]] = []
    bar = tqdm(total=len(jobs), desc="synth", unit="img", disable=not progress)
    if workers == 1:
        for task in tasks:
            boxes.extend(_render_chunk(task))
            bar.update(len(task[0]))
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for task, result in zip(tasks, pool.map(_render_chunk, tasks), strict=True):
                boxes.extend(result)
                bar.update(len(task[0]))
    bar.close()

    missing = [(j.name, k) for j, b in zip(jobs, boxes, strict=True) for k in j.kinds if k not in b]
    if missing:
        log.warning("%d planted finding(s) fell outside the image and have no box, e.g. %s", len(missing), missing[:3])
    truth = [(j.name, k, b[k]) for j, b in zip(jobs, boxes, strict=True) for k in j.kinds if k in b]
    bbox = _bbox_subset(jobs, boxes, seed, bbox_fraction)
    atomic_write_text(root / writer.DATA_ENTRY_NAME, writer.data_entry_text(jobs, size))
    atomic_write_text(root / writer.TRUTH_NAME, writer.box_rows_text(writer.TRUTH_HEADER, truth, official=False))
    atomic_write_text(root / writer.BBOX_NAME, writer.box_rows_text(writer.BBOX_HEADER, bbox, official=True))
    atomic_write_text(root / writer.TRAIN_VAL_NAME, writer.name_list_text(j.name for j in jobs if j.split == "train_val"))
    atomic_write_text(root / writer.TEST_NAME, writer.name_list_text(j.name for j in jobs if j.split == "test"))
    labels = label_matrix(jobs)
    atomic_write_json(root / writer.META_NAME, {
        "generator": f"cxrloc {__version__} synth",
        "arguments": {"images": n_images, "size": size, "seed": seed, "difficulty": diff.name, "bbox_fraction": bbox_fraction},
        "difficulty": dataclasses.asdict(diff),
        "images": len(jobs),
        "patients": len({j.patient for j in jobs}),
        "splits": {s: sum(j.split == s for j in jobs) for s in ("train_val", "test")},
        "no_finding": int((labels.sum(1) == 0).sum()),
        "positives": {f: int(n) for f, n in zip(FINDINGS, labels.sum(0), strict=True)},
        "target_prevalence": TARGET_PREVALENCE,
        "bbox_list_rows": len(bbox),
        "truth_boxes": len(truth),
        "findings_without_box": len(missing),
    })
    return SynthResult(root=root, jobs=jobs, boxes=boxes, bbox_rows=len(bbox), seconds=time.perf_counter() - t0)


def _bbox_subset(jobs: list[ImageJob], boxes: list[dict[str, Box]], seed: int, fraction: float) -> list[tuple[str, str, Box]]:
    """BBox_List rows: every box finding of a random ``fraction`` of the test images that have one."""
    candidates = [i for i, j in enumerate(jobs) if j.split == "test" and any(k in BOX_FINDINGS and k in boxes[i] for k in j.kinds)]
    rng = np.random.default_rng([seed, KEY_BOXES])
    chosen = sorted(rng.permutation(candidates)[: int(round(fraction * len(candidates)))].tolist())
    return [(jobs[i].name, k, boxes[i][k]) for i in chosen for k in jobs[i].kinds if k in BOX_FINDINGS and k in boxes[i]]
