"""The self-supervised image family: encoders and heads, multi-view augmentation, the unlabeled multi-view stream,
the label-free objectives' hosts (SimCLR, BYOL) and the frozen-representation evaluation (online linear probe,
weighted kNN, RankMe) that InterCLR, GroCo, BSS, transitive invariance, RankMe and the generative-vs-discriminative
study build on."""

LAYER = "family"  # core -> families -> papers; tests/test_layout.py checks the imports
