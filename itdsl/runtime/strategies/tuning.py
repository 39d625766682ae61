"""The tunables of the strategies' runners, in one place (the tests shrink them)."""

CHUNK = 64  # scan chunk: parallel inside, recurrent across
SEGMENT = 64  # chunks per segment of a causal low-rank scan (segments run one by one)
ROWS, COLS = 256, 512  # attention tiles (rows of x, columns of y)
DIRECT_TAPS = 96  # a convolution with more taps than this runs by FFT
USE_SDPA = True  # plain attention by torch's scaled_dot_product_attention (else its own tiles)
USE_FUSED = True  # on the CPU, attention forwards by the fused TVM kernel where it applies
# SDPA only where eps · (a bound on |score|) is at most this: its stored log-sum-exp rounds
# to the float spacing at the row max (float32: |score| up to ~3e4; float64: ~1e13)
SDPA_SCORE_BOUND = 2.0 ** -9
LATTICE_DIRECT_TAPS = 1024  # a lag convolution whose bracket spans more taps runs by FFT
