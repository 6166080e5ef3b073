"""The few-shot family: base-class training data, frozen-feature banks and seeded N-way K-shot episodes."""
LAYER = "family"
