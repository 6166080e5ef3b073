"""Wang, He & Gupta, *Transitive Invariance for Self-supervised Visual Representation Learning* (ICCV 2017): a
Triplet-Siamese ranking loss on pairs mined from a graph of video objects (intra-instance, inter-instance and
transitive edges); DAVIS-2016 object patches stand in for the paper's YouTube mining."""
from .data import TransitiveGraphDataModule
from .module import TransitiveInvariance, ranking_hard_loss

__all__ = ["TransitiveInvariance", "TransitiveGraphDataModule", "ranking_hard_loss"]
