"""Experiment: ITNet against plain baselines (MLP, CNN, Transformer, GRU) on small data sets."""
