"""Preset studies of the tutorial systems, one module per study (see README.md here). A grid
module has ``spec(quick=False) -> GridSpec``, run through ``pdiff.compare.compare``; a pipeline
module (one model trained, then evaluated several ways: ``_pipeline.py``) has
``config(quick=False) -> TrainConfig``. Every module has ``main(argv=None) -> int``;
``python -m experiments.NAME --help`` lists the options."""

# module name -> what it reproduces; tests/test_experiments.py smoke-runs every entry and fails
# when a module here is missing from the list.
EXPERIMENTS = {
    "mixture1d_mean_variance": "1D mixture, separate mean and variance networks on the bound, "
                               "T = 250, constant beta = 0.02",
    "clusters8_schedules": "8 clusters, linear against quadratic schedule, sinusoidal-embedding MLP, "
                           "T = 250",
    "moons_polynomial": "2D moons scaled to [-1, 1], T = 10, polynomial schedule",
    "digits_objectives": "8x8 digits in bits/dim: L_simple, L_hybrid, L_vlb x fixed and learned "
                         "variances x linear and cosine schedules, and mu~ against eps prediction "
                         "under the true bound (Ho et al. Table 2, Nichol & Dhariwal)",
    "likelihoods_mixture1d": "1D mixture: the weighted-loss family and the continuous bound as "
                             "objectives; discrete bound, continuous bound and ODE NLL per run",
    "likelihoods_8gaussians": "8 Gaussians: the same objectives and three likelihood estimators",
    "likelihoods_digits": "8x8 digits in bits/dim: the same objectives and three likelihood "
                          "estimators (the ODE on dequantized digits)",
    "woodblock_clipping": "a folder of woodblock-print-style images (a labelled stand-in built "
                          "from the digits unless --data-dir): bound and samples with and "
                          "without x_0 clipping",
    "cifar10_guidance": "class-conditional CIFAR-10 (or digits, MNIST) with classifier-free "
                        "guidance: FID, precision, recall and class accuracy per guidance scale, "
                        "and DDIM / another schedule with fewer steps",
}
