"""Beyond Cosine Decay: the infinite learning-rate schedule for continual (MAE) pre-training (Singh, Janson et al.,
CoLLAs 2025)."""
