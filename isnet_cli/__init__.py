"""isnet: train chest X-ray classifiers whose LRP relevance stays inside the lungs (ISNet)."""

__version__ = "0.1.0"
