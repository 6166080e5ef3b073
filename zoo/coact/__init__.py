"""CoACT: consistency-guided asynchronous contrastive tuning for few-shot class-incremental tuning of foundation
models (Roy et al., TMLR 2025; official code ``ShuvenduRoy/CoACT-FSCIL``)."""
