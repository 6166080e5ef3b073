"""SLA: self-supervised label augmentation (Lee, Hwang & Shin, ICML 2020)."""
