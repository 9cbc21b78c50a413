"""S2LIC (zoo/models/s2lic.py) is an image codec, not a classifier: the classifier contract skips it (see
tests/tiny_configs.py) and tests/test_s2lic.py checks it instead."""

TINY = []

REPRESENTATIVES = []

NO_GRADIENT = {}

PARITY_FOLDERS = []
