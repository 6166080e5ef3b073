"""Consistent-Teacher (Wang et al., CVPR 2023): semi-supervised object detection."""
