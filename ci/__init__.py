"""Checks that run outside the test suite: on a lent GPU machine, or against a build made elsewhere."""
