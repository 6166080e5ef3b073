"""PL-FMS: Online Continual Learning on Hierarchical Label Expansion (Lee, Jung, Choi & Chun, ICCV 2023; official
code ``Hyun1A/HLE``)."""
