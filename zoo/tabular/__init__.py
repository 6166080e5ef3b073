"""The tabular family: tables as rows of standardised numerical features (scikit-learn's bundled tables offline, the
T-JEPA paper's OpenML tables by download), the row stream on the core data contract, and the downstream evaluation
of a feature matrix (raw features or frozen representations) with an MLP and gradient-boosted trees."""

LAYER = "family"  # core -> families -> papers; tests/test_layout.py checks the imports
