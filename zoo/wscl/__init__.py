"""WSCL: Generic image manipulation detection with weakly-supervised self-consistency learning (Zhai et al.,
ICCV 2023; official code ``yhZhai/WSCL``)."""
