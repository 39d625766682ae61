"""Integral Neural Networks: convert, permute, resample, export, train (itdsl.inn).

    from itdsl import inn
    net = inn.convert(model.eval(), example_input)   # the same outputs, integral layers
    net.groups                                       # {name: channels}: axes sharing a grid
    small = net.resample(0.7)                        # 70 % of every group, no fine-tuning
    plain = small.export()                           # plain nn.Conv2d / nn.Linear layers
    small.tune_grid(loader, steps=200)               # learn the resampled axes' nodes
    inn.fit(inn.convert(model.train(), x), loader)   # train so that every width works
    net.resample(0.7).calibrate(batches)             # BatchNorm statistics at that size
"""

from .convert import IntegralNet, convert
from .train import fit

__all__ = ["convert", "fit", "IntegralNet"]
