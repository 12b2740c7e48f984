"""Coded concepts of the app's SR and SEG: finding types from the bundle's label map, and our own identity.

A class name of the label map becomes a SNOMED CT concept when pydicom's code dictionary has one of that name
(``nodule`` -> SCT 27925004 "Nodule", ``lymph_node`` -> SCT 59441001 "Lymph Node", ...), looked up there so no
code value is typed by hand here. Any other name is coded in our private scheme :data:`PRIVATE_SCHEME`
(``99NNDET``; DICOM reserves designators starting with ``99`` for local schemes), code value = the class name
in upper case, meaning = the class name as the label map spells it. Readers that do not know the scheme still
show the meaning.
"""

from __future__ import annotations

import re

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

PRIVATE_SCHEME = "99NNDET"
PRIVATE_SCHEME_NAME = "nndet-monai private codes"

# the finding category every finding of a detector shares (SEG needs one; SR groups carry it too)
MORPHOLOGIC_ABNORMALITY = codes.SCT.MorphologicallyAbnormalStructure
DETECTION_SCORE = codes.DCM.Probability  # DCM 122157: the score of a finding as a probability
NO_UNITS = CodedConcept("1", "UCUM", "no units")
MILLIMETRE = CodedConcept("mm", "UCUM", "millimeter")
COMMENT = codes.DCM.Comment
# TID 1500 row 12 (not in pydicom's dictionary): where a report without measurements says so
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
BOUNDED_BY = codes.SCT.BoundedBy  # CP-1852: the region's outline bounds the finding (a box, not a contour)
IMAGING_PROCEDURE = codes.SCT.ImagingProcedure
# the box's extents, on the image as a viewer shows it: across (column direction), down (row direction), and
# through the slices
WIDTH = codes.SCT.Width
HEIGHT = codes.DCM.Height
DEPTH = codes.SCT.Depth

# common synonyms the label maps of detection datasets use, mapped to the dictionary's keyword
_SYNONYMS = {"tumour": "Tumor", "lesions": "Lesion", "nodules": "Nodule", "masses": "Mass", "node": "LymphNode",
             "lymphnode": "LymphNode", "lymph_nodes": "LymphNode"}


def _keyword(name: str) -> str:
    """``"lymph_node"`` / ``"lymph node"`` / ``"Lymph-Node"`` -> ``"LymphNode"`` (pydicom's keyword style)."""
    return "".join(w[:1].upper() + w[1:].lower() for w in re.split(r"[^0-9A-Za-z]+", name) if w)


def finding_type(class_name: str) -> CodedConcept:
    """The coded finding type of a class of the bundle's label map (see module docstring)."""
    key = _SYNONYMS.get(class_name.strip().lower(), _keyword(class_name))
    code = getattr(codes.SCT, key, None) if key else None
    if code is not None:
        return CodedConcept(code.value, code.scheme_designator, code.meaning)
    value = re.sub(r"[^0-9A-Z_]+", "_", class_name.strip().upper())[:16] or "FINDING"
    return CodedConcept(value, PRIVATE_SCHEME, class_name.strip()[:64] or "finding")
