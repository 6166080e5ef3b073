"""The thin common base: plumbing every paper shares, and no paper's idea."""

LAYER = "core"  # core -> families -> papers; tests/test_layout.py checks the imports
