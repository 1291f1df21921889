"""The Diffusers schedulers of this package, one per module (``analytic_dpm``, whose table is ``analytic_table``), with
what they share: per-model tables saved beside a scheduler's config (``table_file``), how a Diffusers config maps onto
them (``diffusers_config``), and custom timesteps for any Diffusers scheduler (``timesteps``)."""
