"""Every Monte Carlo pass over a model: the moments of the variance table, latents of Stable Diffusion-type pipelines,
the sample cost of the sample-quality trajectory, their data sources, checkpoints, distributed gather and
``precompute``."""
