"""Self-supervised Learning for Large-scale Item Recommendations (Yao et al., CIKM 2021): a two-tower retriever with
in-batch softmax + log-Q correction, regularised by an item-side SSL task on complementary correlated feature masks
(CFM)."""
