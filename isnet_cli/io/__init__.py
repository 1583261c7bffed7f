"""File -> calibrated image/mask -> model input. No torch here except in `dataset.py`."""
