"""Everything that runs inside a hospital: manifest, imaging, extraction, feature store."""
