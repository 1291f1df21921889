"""``python -m analytic_sampler`` runs the ``analytic-sampler`` command (handy under ``torchrun`` / ``accelerate launch``)."""

from .commands.cli import main

if __name__ == "__main__":
    main()
