"""The evaluation floor: bits/dim, KL and the discretised decoder, Fréchet distance, the baselines, the batched
sampling loop and the provenance of results. Imports the library, never the digits world or the commands."""
