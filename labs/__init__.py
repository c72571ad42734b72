"""Labs graded by slimgrade, one plug-in each (grader/lab.py)."""
