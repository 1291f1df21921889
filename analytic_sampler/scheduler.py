"""The module path that pipelines saved by earlier versions name in their ``model_index.json``
(``["analytic_sampler.scheduler", "AnalyticDPMScheduler"]``); the scheduler lives in
:mod:`analytic_sampler.schedulers.analytic_dpm`."""

# Diffusers finds a component's loading methods through its base classes, looked up by name in this module.
from diffusers.configuration_utils import ConfigMixin  # noqa: F401
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from .schedulers.analytic_dpm import AnalyticDPMScheduler, AnalyticDPMSchedulerOutput  # noqa: F401
