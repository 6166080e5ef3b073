"""The continual-learning family: class-incremental task streams over an image set (the current task a function of
the global step), the per-task evaluation matrix R[i][j] with average accuracy and forgetting, frozen-feature
probes (linear, kNN), and the anneal-on-a-copy evaluation of the infinite learning-rate schedule."""

LAYER = "family"  # core -> families -> papers; tests/test_layout.py checks the imports
