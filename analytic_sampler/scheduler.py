"""The module path that pipelines saved by earlier versions name in their ``model_index.json``
(``["analytic_sampler.scheduler", "AnalyticDPMScheduler"]``); the scheduler lives in
:mod:`analytic_sampler.schedulers.analytic_dpm`."""

from .schedulers.analytic_dpm import AnalyticDPMScheduler, AnalyticDPMSchedulerOutput  # noqa: F401
