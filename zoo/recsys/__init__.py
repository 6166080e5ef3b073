"""The interactions family: recommender logs as (query, item) interactions with categorical user and item features.

MovieLens loading (offline files, real download path for MovieLens-1M), the interaction and item-corpus streams on
the zoo's data contract, the two-tower building blocks (categorical feature embeddings, towers) and retrieval
evaluation (recall@K over the full item corpus, overall and on the long-tail item slice)."""

LAYER = "family"  # core -> families -> papers; tests/test_layout.py checks the imports
