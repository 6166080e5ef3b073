"""T-JEPA (Thimonier, De Melo Costa et al., ICLR 2025): augmentation-free self-supervision for tabular data by
predicting, in latent space, the EMA target encoder's representations of feature subsets from a context subset."""
