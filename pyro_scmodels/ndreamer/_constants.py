"""NDreamer's numbers, named once (SPEC 3). Loss weights and loss hyperparameters live in
:class:`~pyro_scmodels.ndreamer.LossWeights`; everything else is here."""

# --- preprocessing (SPEC 3.1) --------------------------------------------------------
NUM_HVG = 2000
RESPONSE_GENE_SHARE = 0.1  # share of num_hvg given to the genes that differ most between conditions
TARGET_SUM = 1e4  # counts per cell before log1p
LOG_DATA_MAX = 30.0  # non-integer values all below this are taken as already log-normalised
LOG_CHECK_SAMPLE = 1_000_000  # values inspected to decide counts vs log data
# non-integer data whose row sums differ by less than this share is normalised but not logged (refused)
NORMALISED_SUM_TOLERANCE = 1e-3
LEIDEN_RESOLUTIONS = (0.5, 7.0)  # low and high resolution pseudo cell states
LEIDEN_PCA_COMPONENTS = 50
LEIDEN_NEIGHBOURS = 15
LEIDEN_ITERATIONS = 2
MIN_CELLS_PER_GROUP = 10  # fewest cells in a batch x condition group (smaller groups are refused)
MIN_CELLS_FOR_CATE = 10  # fewest treated and control cells in a CATE group (smaller groups are skipped)
MIN_CELLS_FOR_LEIDEN = 30  # smaller batch x condition groups get a single label
# the most cells of a group left alone in their high-resolution label: a lone cell has no positive in the triplet
# term (a group of 60 cells at resolution 7 left 57 % of its cells alone); the resolution is lowered until it holds
LEIDEN_MAX_SINGLETON_SHARE = 0.1
# the variable genes are chosen on at most this many cells (a seeded sample, every batch x condition
# group in proportion and at least HVG_MIN_CELLS_PER_GROUP of each): the all-genes matrix of 10^6 cells
# would not fit in memory, and the genes' means and dispersions are settled long before
HVG_MAX_CELLS = 50_000
HVG_MIN_CELLS_PER_GROUP = 500

# --- network (SPEC 3.2) --------------------------------------------------------------
ENCODER_HIDDEN = (1024, 512)
N_CODEBOOKS = 32
CODEBOOK_SIZE = 1024
CODEBOOK_DIM = 8
EMBEDDING_DIM = 512
Z_DIM = 256
DECODER_HIDDEN = (512, 1024)
GUMBEL_TAU = 0.01
# cells drawn between re-initialisations of rarely used codes: 30 default minibatches, or
# DEAD_CODE_RESET_PASSES passes over smaller data, so that the default 15 passes reset at every data
# size. Not once per pass: measured on simulate(3000 cells, effect_modifier=1) (15 passes, ~45k
# cells drawn), per-cell ITE r at k = 10 was 0.70 with one reset, 0.67 with three and 0.59 with one
# per pass; each reset moves cells to other codes, and frequent resets wash out the within-type state
DEAD_CODE_RESET_CELLS = 30 * 1024
DEAD_CODE_RESET_PASSES = 10
RESIDUAL_EXPANSION = 2  # inner width of the residual block, in multiples of its width
LOGVAR_BOUNDS = (-12.0, 8.0)  # exp(logvar) can neither overflow nor vanish early in training

# named configurations (network size and loss weights): ndreamer.presets.network_preset
NETWORK_PRESET_NAMES = ("default", "small")

# --- training (SPEC 3.4) -------------------------------------------------------------
PASSES = 15  # default training: about 15 passes over the data
BATCH_SIZE = 1024
LEARNING_RATE = 1e-3  # AdamW
GRADIENT_CLIP_NORM = 10.0
MIN_CELLS_PER_GROUP_DRAW = 2  # each group gives at least this many cells to every minibatch
CHECKPOINT_EVERY = 1  # passes between checkpoints

# --- matching (SPEC 3.5) -------------------------------------------------------------
# cells per block when reading the input (a backed .X is read from disk one block at a time)
READ_CHUNK_CELLS = 10_000
WRITE_CHUNK_CELLS = 10_000  # cells whose effects are computed and written at a time (NDreamer.write_effects)
# the matched ITE's default shrinkage (ndreamer.ite_shrinkage). Measured on simulate(3000, 500, effect_modifier=1.0),
# six seeds (benchmarks/RESULTS.md, "Shrunk matched effects ... the default"): CATE r 0.937-0.963 -> 0.976-0.980 and
# the false effect 0.052-0.070 -> 0.006-0.011 in NDreamer's space, the same in a RegularizedVI latent; slope lower
# by 0.01-0.03. None turns it off
SHRINK = "clusters"

MATCHING_PCA_COMPONENTS = 50
# matched cells per group. k = 1 (causal matching, the public NDreamer's default) leaves the count
# noise of a single partner in every effect (benchmarks/bench_effects.py, simulate(effect_modifier=1.0)). k = 20
# (2026-12-05, benchmarks/RESULTS.md "The number of matched partners"): on 1,500, 3,000 and 6,000 cells
# (250-1,000 a group, nine seeds in all) it gained 0.001-0.022 per-cell r over k = 10 on every one, CATE r
# and false effect unchanged; k = 40 gains more on the larger data but loses up to 0.033 at 250 cells a group
NEAREST_NEIGHBOR = 20
BANDWIDTH = 1.0
MODEL_ITE_SAMPLES = 20
MODEL_ITE_QUANTILES = (0.05, 0.95)
