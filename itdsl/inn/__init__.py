"""Integral Neural Networks: convert, permute, resample, export, train (itdsl.inn)."""
