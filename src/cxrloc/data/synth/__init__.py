"""Synthetic chest X-ray phantoms in the ChestX-ray14 layout (``cxrloc synth``).

Modules: :mod:`.canvas` (coordinates, soft shapes), :mod:`.anatomy` (the body),
:mod:`.findings` (the 14 findings and the difficulty knob), :mod:`.render`
(one image + true boxes), :mod:`.cohort` (patients, labels, split), :mod:`.writer`
(file formats), :mod:`.generator` (the dataset folder), :mod:`.examples` (the
example grid in docs/).

Example:
    >>> from cxrloc.data.synth import Phantom, render, sample_finding, DIFFICULTIES
    >>> out = render(Phantom(), [], 128)          # a default normal phantom
    >>> out.image.shape, out.image.dtype
    ((128, 128), dtype('uint8'))
"""

from cxrloc.data.synth.anatomy import Acquisition, Anatomy, Phantom, sample_acquisition, sample_anatomy
from cxrloc.data.synth.canvas import Pose
from cxrloc.data.synth.cohort import ImageJob, plan_cohort
from cxrloc.data.synth.findings import DIFFICULTIES, Difficulty, Finding, sample_finding
from cxrloc.data.synth.generator import SynthResult, generate_dataset, phantom_for, render_job
from cxrloc.data.synth.render import Rendered, render

__all__ = [
    "DIFFICULTIES",
    "Acquisition",
    "Anatomy",
    "Difficulty",
    "Finding",
    "ImageJob",
    "Phantom",
    "Pose",
    "Rendered",
    "SynthResult",
    "generate_dataset",
    "phantom_for",
    "plan_cohort",
    "render",
    "render_job",
    "sample_acquisition",
    "sample_anatomy",
    "sample_finding",
]
