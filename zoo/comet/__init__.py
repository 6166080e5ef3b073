"""COMET (Wang et al., NeurIPS 2023): patient-, trial-, sample- and observation-level contrast on medical time
series, on the time-series family."""
