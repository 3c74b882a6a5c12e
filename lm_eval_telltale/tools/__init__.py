"""The ``telltale`` commands' implementations (see :mod:`lm_eval_telltale.cli`).

- :mod:`.runs`    reading lm-eval run directories: results files, sidecars, run settings
- :mod:`.table`   ``telltale table``: the comparison table model and its builder
- :mod:`.render`  the table as Markdown / CSV / LaTeX / JSON
- :mod:`.plots`   every figure (Δ bars, norm profiles)
- :mod:`.view`    ``telltale view`` (page template: ``view.html``)
- :mod:`.profile` ``telltale profile`` / ``telltale calibrate``
- :mod:`.bench`   ``telltale bench``: decode throughput of every model type against stock vLLM
                  (a package: options, run, cell, hf_cell, report)
- :mod:`.grid`    ``telltale grid``: grids of lm_eval runs, resumable, local or Ray (spec, cells, execute, report)
- :mod:`.rescore` ``telltale rescore`` / ``telltale audit``: logged samples scored again, extraction audited
- :mod:`.checks`  argument checks every command shares (writable destinations, vLLM engine keys)
- :mod:`.demo`    the ``make eval`` driver
- :mod:`.tiny`    ``telltale tiny-model``: deterministic tiny random models for tests

Nothing here is imported by the engine-side code (core, vLLM adapter) or the lm-eval model types.
"""
