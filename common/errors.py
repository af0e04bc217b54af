"""Errors that name the case, the field and the value, so a site can fix its data."""


class FedradError(ValueError):
    """Base class: bad input that fedrad refuses with a specific message."""


class CaseError(FedradError):
    """One case cannot be used; the case is quarantined and the others go on.

    Parameters
    ----------
    patient_id : str
        The case's identifier from the manifest.
    field : str
        The manifest column (or image property) at fault, e.g. ``'time'`` or ``'image_venous'``.
    reason : str
        What is wrong, with the offending value.
    """

    def __init__(self, patient_id: str, field: str, reason: str):
        self.patient_id = str(patient_id)
        self.field = field
        self.reason = reason
        super().__init__(f"case '{self.patient_id}': field '{field}': {reason}")


class ManifestError(FedradError):
    """The manifest as a whole is unusable (unreadable, or a required column is absent)."""


class ParamsError(FedradError):
    """A pyradiomics parameter file is missing or invalid."""


class StoreError(FedradError):
    """A feature store is missing, incomplete or inconsistent."""
