"""iCT: Improved Techniques for Training Consistency Models (Song & Dhariwal, ICLR 2024), with original consistency
training (Song et al., ICML 2023) as switches of the same module."""
