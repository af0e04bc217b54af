"""Names shared by every site: manifest columns, store columns, feature naming.

A federation only works if every site spells its columns the same way, so the
spelling lives here, once.
"""

from __future__ import annotations

ID = "patient_id"
TIME = "time"
EVENT = "event"
SCANNER = "scanner"
MASK = "mask"
MASK_REPEAT = "mask_repeat"
IMAGE_PREFIX = "image_"
FEATURE_SEP = "__"

#: manifest columns with a fixed meaning; every other non-image column is clinical.
RESERVED = (ID, TIME, EVENT, SCANNER, MASK, MASK_REPEAT)


def image_column(phase: str) -> str:
    """Manifest column holding the image path of ``phase`` (``'venous'`` -> ``'image_venous'``)."""
    return f"{IMAGE_PREFIX}{phase}"


def phase_of(column: str) -> str | None:
    """Phase named by an image column, or None if ``column`` is not an image column."""
    if column.startswith(IMAGE_PREFIX) and len(column) > len(IMAGE_PREFIX):
        return column[len(IMAGE_PREFIX):]
    return None


def feature_column(phase: str, feature: str) -> str:
    """Store column of a radiomics feature: ``'<phase>__<pyradiomics name>'``."""
    return f"{phase}{FEATURE_SEP}{feature}"


def is_feature_column(column: str) -> bool:
    return FEATURE_SEP in column


#: prefix of the CNN's deep features (penultimate layer), e.g. ``deep__cnn_0042``
DEEP_PREFIX = f"deep{FEATURE_SEP}"


def is_deep_feature(column: str) -> bool:
    return column.startswith(DEEP_PREFIX)
