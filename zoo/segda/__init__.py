"""The domain-adaptive segmentation family: DAFormer's self-training host, its networks and its source/target data,
which MIC, FST and HIAST extend."""

LAYER = "family"  # core -> families -> papers; tests/test_layout.py checks the imports
