"""Experiment: does an Integral Neural Network (`itdsl.inn`) prune by resampling better than L1
structured pruning, without fine-tuning? Run it with `python -m experiments.inn.run`."""
