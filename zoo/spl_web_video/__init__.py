"""SPL: learning from weakly-labelled web videos via sub-pseudo labels (Li et al., AAAI 2022; arXiv 2101.03713)."""
