"""Garrido et al., *RankMe: Assessing the Downstream Performance of Pretrained Self-Supervised Representations by
Their Rank* (ICML 2023), as an experiment on the ssl family's toolkit: across checkpoints and hyper-parameter
settings of one SSL method, does the effective rank of the embeddings (no labels) rank them as linear-probe accuracy
(labels) does, and what does selecting the hyper-parameter by RankMe cost against selecting it with labels?"""
