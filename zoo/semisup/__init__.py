"""The semi-supervised image family: the labeled/unlabeled data protocol FixMatch, UDA, ShrinkMatch, SimMatchV2 and
the supervised baseline train on."""

LAYER = "family"  # core -> families -> papers; tests/test_layout.py checks the imports
