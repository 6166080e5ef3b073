"""Shared building blocks of the language-model papers.

- ``tiny``: the byte tokenizer, :class:`~zoo.lm.tiny.CausalLM` (tiny config, hub model, zoo checkpoint, LoRA) and the
  pre-training / SFT module and data modules (``experiments/lm_*.yaml``);
- ``corpora``: offline corpora and prompt sets with checkable targets;
- ``generation``: N samples per prompt, masked sequence log-probs, distinct-n;
- ``preference``: DPO with soft labels and weights, ordinal ranks, Kendall tau, CREAM's consistency rate;
- ``rounds``: the round driver (one epoch = sample -> score -> train on fresh prompts);
- ``heads`` / ``embeddings``: sequence heads, reward-model and weak-to-strong losses, offline sentence embeddings.
"""

LAYER = "family"  # core -> families -> papers; tests/test_layout.py checks the imports
