"""CI install steps and checks too long for the test suite, each module run as ``python -m ci.<name>``: lanes
that compile for another machine, and the one-shot check for a lent GPU machine."""
