"""The commands floor: the ``analytic-sampler`` command line, ``bench`` and the ``demo``."""
