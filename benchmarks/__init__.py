"""`make bench`: speed and memory of the lab's parts (see ``benchmarks/run.py``)."""
