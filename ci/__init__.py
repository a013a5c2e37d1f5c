"""CI lanes that are too long for the test suite, each a module run as ``python -m ci.<lane>``."""
