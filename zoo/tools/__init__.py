"""Command-line tools that stand apart from the library: smoke, bench, bench-data, compare."""

LAYER = "tools"  # core -> families -> papers; tests/test_layout.py checks the imports
