"""McKee et al., *Transfer of Representations to Video Label Propagation: Implementation Factors Matter* (2022):
training-free label propagation from frozen features (first frame + previous n frames as context, affinities of
L2-normalised features within a spatial radius, top-k softmax with temperature), scored with the DAVIS J&F, and a
study that moves each implementation factor alone around CRW's defaults (``python -m zoo.label_prop_factors.study``).
Encoders come from the ssl family."""
