"""AutoWS-Bench-101 (Roberts et al., NeurIPS 2022 Datasets & Benchmarks): automated weak supervision -- Snuba LFs
from 100 labels, the Snorkel label model, a soft-label end model -- against few-shot and real-LF baselines."""
