"""Zheng et al., *Revisiting Discriminative vs. Generative Classifiers: Theory and Implications* (ICML 2023): the
shared-variance Gaussian naive Bayes against logistic regression on frozen features, as a function of the number of
training samples. Built on the ssl family's feature banks and sample-size sweep (``zoo.ssl.bank``)."""
