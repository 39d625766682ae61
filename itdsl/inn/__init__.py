"""Integral Neural Networks: convert, permute, resample, export, train (itdsl.inn).

    from itdsl import inn
    net = inn.convert(model.eval(), example_input)   # the same outputs, integral layers
    net.groups                                       # {name: channels}: axes sharing a grid
    small = net.resample(0.7)                        # 70 % of every group, no fine-tuning
    plain = small.export()                           # plain nn.Conv2d / nn.Linear layers
"""

from .convert import IntegralNet, convert

__all__ = ["convert", "IntegralNet"]
