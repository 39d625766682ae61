"""ITNet in itdsl (itdsl.nn): one learnable integral operator — a kernel that is a small MLP
of the two positions and the two tokens — as a token mixer, in blocks and classifiers that
compose with torch (state_dict, torch.compile, DDP).

    from itdsl import nn as itnn
    tokens, pos = itnn.patches(images, 4)
    net = itnn.ITNet(16, dim=32, depth=2, classes=10, kind="mlp")   # or "softmax",
    logits = net(tokens, pos)                      # "causal", "lowrank", "montecarlo"
"""

from .mix import KINDS, Mix, mix_source
from .model import ITNet, ITNetBlock, patches, pixels, series

__all__ = ["ITNet", "ITNetBlock", "Mix", "KINDS", "mix_source", "patches", "pixels", "series"]
