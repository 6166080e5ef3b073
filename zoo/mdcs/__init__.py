"""MDCS: More Diverse Experts with Consistency Self-distillation for long-tailed recognition (Zhao et al.,
ICCV 2023; official code ``fistyee/MDCS``)."""
