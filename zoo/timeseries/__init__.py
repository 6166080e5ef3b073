"""The time-series family: the offline UCR/UEA sets and the medical sets of COMET (windows with their sample, trial
and patient ids, never invented), the stream that groups a batch by trial or patient, TS2Vec's dilated-convolution
encoder with its timestamp masks, and the downstream evaluation (label fractions, a logistic-regression probe on
frozen features, accuracy / macro-F1 / AUROC) that time-series SSL papers share."""

LAYER = "family"  # core -> families -> papers; tests/test_layout.py checks the imports
