"""The examples in the public API's docstrings run offline and show what they say."""

import doctest

import pytest

from analytic_sampler import AnalyticDPMScheduler, VarianceTable, estimate_moments, estimate_solver_statistics, nll_bpd


@pytest.mark.parametrize("obj", [AnalyticDPMScheduler, VarianceTable, estimate_moments, estimate_solver_statistics,
                                 nll_bpd],
                         ids=lambda obj: obj.__name__)
def test_docstring_example_runs(obj):
    (test,) = doctest.DocTestFinder(recurse=False).find(obj, obj.__name__, globs={})
    assert any(example.want for example in test.examples), "the example shows no result"
    report = []
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
