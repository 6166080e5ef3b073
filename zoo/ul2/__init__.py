"""UL2: Unifying Language Learning Paradigms (Tay et al., ICLR 2023): the mixture of denoisers (R, X span
corruption and S prefix LM with mode tokens) as a data stream, for a T5 or a decoder-only model."""
