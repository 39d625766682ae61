"""itdsl: a compiler for integral operators  out(x) = ∫ K(x, y) f(y) dμ(y).

    prog = itdsl.compile_file("examples/gauss.it")
    op = prog["gauss_smooth"]          # a torch.nn.Module holding the params
    u = op(X=x, Y=y, b=b)              # compiled kernels for the tensors' device
"""

from .api import Program, compile_file, compile_source
from .errors import (
                     AnalysisError,
                     CheckError,
                     InputError,
                     ItdslError,
                     ItdslErrors,
                     LoweringError,
                     ParseError,
                     UnsupportedError,
)
from .settings import set_memory_budget, set_progress, set_small_pairs, tune_malloc

__version__ = "0.1.0"

__all__ = ["compile_file", "compile_source", "Program", "ItdslError", "ItdslErrors",
           "ParseError", "CheckError", "AnalysisError", "LoweringError", "InputError",
           "UnsupportedError", "set_memory_budget", "set_progress", "set_small_pairs",
           "tune_malloc", "__version__"]
