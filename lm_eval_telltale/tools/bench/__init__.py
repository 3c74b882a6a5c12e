"""``telltale bench``: decode throughput of each model type against stock vLLM on the same
prompts and engine flags. The report gives tokens/s, the ratio to stock, intervention rates and
ALRR's compute limit.

::

    telltale bench --model PATH [--methods vllm,norms,suppress,alrr,erss,lrs] [--batch-sizes 1,8,32,64]
                   [--max-tokens 256] [--repeats 3] [--eager] [--alternate] [--out DIR]

**Cells.** Each (method, batch size, repeat) is one *cell*. A cell gets a fresh engine in its own
process (``python -m lm_eval_telltale.tools.bench.cell SPEC``), so neither a compile cache in
memory nor an allocator state nor the vLLM environment carries over. The order is
``for repeat: for batch: for method``, so the repeats are interleaved across methods and any
drift of the machine hits every method alike. A cell:

1. builds the engine the way the lm-eval model types do. For a telltale method that is
   :func:`lm_eval_telltale.config.resolve` followed by
   :func:`lm_eval_telltale.vllm.assemble_engine_args` with ``salted_requests=True`` (every request gets
   its own ``cache_salt``). For ``vllm`` it is plain ``LLM(...)``. Every method receives the same
   common flags: ``--dtype``, ``--eager``, ``--engine-args``, seed, ``max_model_len`` =
   prompt + max tokens, ``max_num_seqs`` = the largest request count at this batch size, and on
   the CPU engine a KV cache sized for those requests. The time to build the engine (including
   torch.compile and CUDA-graph capture) is reported as *start-up*;
2. runs an untimed warm-up ``generate`` of B other prompts × 16 tokens, which covers first-shape
   effects;
3. times one run of B requests × ``--max-tokens`` with ``ignore_eos=True`` and temperature 0,
   stepping the engine (:func:`timed_run`: as ``LLM.generate`` does, but with each step's new
   tokens reported, which one run of the bench pays for every method alike). The B prompts are distinct,
   ``--prompt-len`` tokens each, and identical in every cell. **Decode tokens/s** = the tokens
   generated after every request had its first token ÷ the time after that moment: the
   throughput without the prompts' prefill, which is what the ratios compare. **End-to-end
   tokens/s** (all generated tokens ÷ the whole run, prefill included) is reported beside it;
4. for a telltale method, collects the requests' statistics (``telltale_collect``; not timed) and
   the method's counters (``telltale_state``).

**``--alternate``** measures differently where the machine drifts more than the effect (small
models, short steps, batch 1): at each batch size one engine per method is started (one after
another, each in its own process, built and warmed up as above) and all stay up; then
``--repeats`` rounds each time one run of every method, the order rotated by one per round. A
method's repeats are its rounds, and each round's paired ratio compares runs seconds apart
instead of cells minutes apart. Every method's engine is in memory at once, so this suits models
that fit several times over (on a GPU, rarely). Start-up is measured once per engine.

**LRS** is measured for its scoring overhead. At batch size B, ``vllm-lrs`` runs B prompts × N
candidates (N = ``n_candidates``, default 4), i.e. B·N independent sampled requests. Each
request is seeded per candidate (T 0.7, top-p 0.8, top-k 20: the reference demo's settings, as
in the ``telltale-arith`` preset), with the norms and DeepConf confidence recorded as in
``vllm-lrs``. Its ratio is taken against ``vllm-sampled``: stock vLLM running the same B·N
requests with the same seeds and sampling settings. The N-fold sampling is therefore in both,
and the ratio is the cost of recording and scoring. The selection itself (an argmax per prompt,
in the driver) is negligible and not timed. On the CPU engine both run with chunked prefill off
(``max_num_batched_tokens = max(max_model_len, max_num_seqs)``). ``vllm-lrs`` needs this for seeded requests on
vLLM 0.32's CPU runner, and stock vLLM fails the same way without it.

**Ratio** = median decode tokens/s of the method ÷ median decode tokens/s of its stock baseline
at the same batch size (``--engine hf`` cells time one ``generate`` call, prefill included, and
their ratios are end-to-end). The per-repeat paired ratios are in the JSON. The telltale types also bring their
own engine settings (``engine_kwargs``: the V1 model runner; async scheduling off and, on GPU,
piecewise CUDA graphs split at the telltale ops, but for the in-graph types — those whose step
runs in the model's graph (:func:`lm_eval_telltale.vllm.graph.in_graph`) call no op and keep vLLM's
async scheduling where their statistics stay exact). Stock ``vllm`` keeps vLLM's defaults,
so on GPU the ratio includes what those settings cost. To give stock the same settings, pass
``--engine-args '{"async_scheduling": false}'`` and set ``VLLM_USE_V2_MODEL_RUNNER=0`` in the
environment. Each cell's effective settings are recorded in the JSON.

**ALRR's compute limit.** The re-run pushes rows through a patched layer a second time.
``Alrr.summary()`` counts the rows re-run in the timed call: every request token row of every step
(the default), or of a step with at least one candidate (``skip_sync=true``). The limit is
stock tokens/s × L / (L + re-run rows per generated token), where L is the model's number of
layers. This is the throughput ALRR would reach if the extra layer passes were its only cost. It
counts layer passes over generated tokens only and ignores the prompt's.

**Knobs.** The defaults make the methods act on a random model: ``warmup=8`` for every method
(τ exists early), ALRR ``growth_eps=0``, ERSS ``low_k=4, cooldown=8, bank_k=8`` (the
``telltale-arith`` preset's values) and LRS ``n_candidates=4``. ``--knobs`` overrides them per
method (``{"alrr": {"growth_eps": 0.2}, "common": {"warmup": 64}}``).

**``--engine hf``** measures the ``hf-*`` types on transformers the same way: a cell loads the
model with ``from_pretrained`` (``--engine-args``: ``device`` and ``from_pretrained`` arguments),
the telltale methods generate with the hf adapter's loop (:mod:`lm_eval_telltale.hf.runtime`) and
the stock cells with transformers' own ``model.generate`` (``hf``, and ``hf-sampled`` for LRS),
``min_new_tokens`` = ``max_new_tokens`` in place of ``ignore_eos``. ``--eager`` does not apply.

Output: ``<out>/<model-name>.md`` (the exact command line at the top), ``.json`` (every cell)
and ``.png`` (the ratio to stock against batch size, one line per method, with a 1.0 line and
ALRR's compute limit). ``--plan`` checks every argument and prints the cells without starting
an engine.

The package, by job: :mod:`.options` (the command line and every check that needs no engine),
:mod:`.run` (the cells' processes, ``--alternate``, the report's meta), :mod:`.cell` (one vLLM
cell, in its own process), :mod:`.hf_cell` (one transformers cell) and :mod:`.report` (the
report from the cells' results: Markdown, JSON, plot; pure).
"""

from .run import main

__all__ = ["main"]
