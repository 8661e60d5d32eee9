"""Hard-example mining (section 3.2): pHash index of the cache and the triplet sampler with curriculum."""

from cxrloc.mining.phash import hamming, phash_batch, phash_index, resize32
from cxrloc.mining.triplets import CandidateBlock, MiningReport, TripletMiner, curriculum_window

__all__ = [
    "CandidateBlock",
    "MiningReport",
    "TripletMiner",
    "curriculum_window",
    "hamming",
    "phash_batch",
    "phash_index",
    "resize32",
]
