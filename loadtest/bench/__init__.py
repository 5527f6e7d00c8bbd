"""``orderq bench``: the headless benchmark (BENCHMARKS.md explains its figures).

- :mod:`~loadtest.bench.command`: the command: find or start the instance, run, print, write.
- :mod:`~loadtest.bench.arguments`: its options and their checks.
- :mod:`~loadtest.bench.instance`: the instance under test (a running one, or a private one on
  :class:`orderq.supervisor.Supervisor`) and the reference endpoint.
- :mod:`~loadtest.bench.phases`: the phases, each adding its section to the report.
- :mod:`~loadtest.bench.cancels`: ``--cancel-share``: cancels while e2e/spike run, then their checks.
- :mod:`~loadtest.bench.sampler`: backlog and breaker stage sampled while a phase runs.
- :mod:`~loadtest.bench.report`: the summary, the targets and the printed text.
- :mod:`~loadtest.bench.console`: progress and messages on stderr.
"""
