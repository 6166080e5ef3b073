"""ITTA: Improved Test-Time Adaptation for Domain Generalization (Chen et al., CVPR 2023; official code
``liangchen527/ITTA``), with its baselines ERM and ERM + Tent, on PACS leave-one-domain-out."""
from .data import DomainGeneralizationDataModule
from .erm import ERM
from .module import ITTA

__all__ = ["DomainGeneralizationDataModule", "ERM", "ITTA"]
