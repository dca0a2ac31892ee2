"""Datasets that ship inside lmsmith, generated on the fly (no download): see `lmsmith.datasets.finance`."""
