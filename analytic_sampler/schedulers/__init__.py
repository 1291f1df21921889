"""The Diffusers schedulers of this package, one per module, with what they share: the table file beside a saved
config, how a Diffusers config maps onto them, and custom timesteps for any Diffusers scheduler."""
