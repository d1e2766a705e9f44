"""Numbers used across the package, named once.

Each number here appears in ``SPEC.md``; changing a default means changing it here only.
"""

# --- RegularizedVI priors (SPEC 1.2) -------------------------------------------------
DISPERSION_RATE_PRIOR = (9.0, 3.0)  # lambda_d ~ Gamma(9, 3), mean 3
AMBIENT_PRIOR = (1.0, 100.0)  # s ~ Gamma(1, 100), mean 0.01
FEATURE_SCALING_PRIOR = (200.0, 200.0)  # y ~ Gamma(200, 200), mean 1, sd ~0.07
LIBRARY_RESIDUAL_WEIGHT_PRIOR = 1.0  # w ~ Exponential(1)
DECODER_WEIGHT_PRIOR_SCALE = 5.0**0.5  # Normal(0, sqrt(5)) == L2 penalty 0.1 * W^2

# --- guide initial values (SPEC 1.3) --------------------------------------------------
INIT_THETA = 9.0  # u = 1 / sqrt(theta) starts at 1/3
INIT_DISPERSION_GUIDE_SCALE = 0.1
INIT_DISPERSION_RATE = 3.0
INIT_FEATURE_SCALING = 1.0
INIT_AMBIENT_FRACTION = 0.2  # s starts at 0.2 x per-category mean normalised expression
INIT_AMBIENT_FLOOR = 1e-8
INIT_LOGNORMAL_GUIDE_SCALE = 0.1
INIT_LIBRARY_RESIDUAL_WEIGHT = 1.0
LIBRARY_ENCODER_HIDDEN = 16
LIBRARY_PRIOR_VARIANCE_FACTOR = 0.5  # log l ~ Normal(m_p, sqrt(0.5 v_p))

# --- numerics ------------------------------------------------------------------------
SCALE_EPS = 1e-4  # floor added to every amortised scale
MEAN_EPS = 1e-8  # floor on the negative-binomial mean

# --- training (SPEC 1.5) --------------------------------------------------------------
BATCH_SIZE = 1024
LEARNING_RATE = 1e-3
ADAM_EPS = 1e-2
WEIGHT_DECAY = 1e-6
GRADIENT_CLIP_NORM = 10.0
KL_WARMUP_EPOCHS = 400
MIN_KL_WEIGHT = 1e-6
TRAIN_SIZE = 0.9
EARLY_STOPPING_PATIENCE = 20
EARLY_STOPPING_MIN_DELTA_PER_GENE = 2e-4
MAX_EPOCHS_CELL_BUDGET = 20_000  # default epochs = min(400, round(20000 / n_cells * 400))
MAX_EPOCHS_CAP = 400
