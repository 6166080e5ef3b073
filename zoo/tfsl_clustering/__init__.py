"""Transductive few-shot learning by regularised clustering (SLK-Means, SLK-MS; Ziko et al., 2021)."""
