"""cxrloc: thoracic disease identification and localization on chest X-rays (DLRV).

Implements Zhang, Chen & Chen, "Thoracic Disease Identification and Localization
using Distance Learning and Region Verification" (BMVC 2020). See README.md for
the command line and ``docs/`` for the design.
"""

__version__ = "0.1.0"
