"""The on-disk compile cache, under `$ITDSL_CACHE_DIR` (see `disk.cache_dir`).

Two products live there: pickled Plans (`plans.py`: the symbolic layer's analysis of an
operator, so a warm process skips sympy) and compiled kernels (`itdsl/runtime/cache.py`:
TVM shared libraries, runtime business). Both write through the helpers of `disk.py`
(the directory, atomic writes, checksums, the versions of the code that made an entry).

Nothing in this package imports torch or TVM: loading a cached Plan must stay light.
Import the modules themselves (`from itdsl.cache import plans`), so that a wrapper set on
`plans.load_plan` (the tests' Plan verifier) is the one every caller reaches.
"""
