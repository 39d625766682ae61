"""The tunables of the strategies' runners, in one place (the tests shrink them)."""

CHUNK = 64  # scan chunk: parallel inside, recurrent across
SEGMENT = 64  # chunks per segment of a causal low-rank scan (segments run one by one)
ROWS, COLS = 256, 512  # attention tiles (rows of x, columns of y)
DIRECT_TAPS = 96  # a convolution with more taps than this runs by FFT
USE_SDPA = True  # plain attention by torch's scaled_dot_product_attention (else its own tiles)
USE_FUSED = True  # on the CPU, attention forwards by the fused TVM kernel where it applies
# ... from this much work on (N·n·m·(width of the factors + of the values) multiply-adds):
# below it the torch tiles and SDPA are as fast, the kernel's start and torch's OpenMP
# threads, which spin for milliseconds after each op and share the cores with the kernel's,
# weigh more than its speed (n = 1,024, N = 4, d = 64: 1.1× slower; 2,048: 1.2–1.4× faster)
FUSED_MIN_WORK = 2 ** 30
# SDPA only where eps · (a bound on |score|) is at most this: its stored log-sum-exp rounds
# to the float spacing at the row max (float32: |score| up to ~3e4; float64: ~1e13)
SDPA_SCORE_BOUND = 2.0 ** -9
LATTICE_DIRECT_TAPS = 1024  # a lag convolution whose bracket spans more taps runs by FFT
