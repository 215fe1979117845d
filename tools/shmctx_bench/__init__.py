"""The pieces of ``tools/bench.py``, shmctx's benchmark against the alternatives.

* ``contenders``: what each contender is, its setup in the parent and its pair in a worker;
* ``runner``: the worker processes and the timing they do;
* ``phases``: the run's phases (setup, interleaved rounds, churn, attach, sweep, memory);
* ``report``: medians, ratios, targets, the markdown tables, machine and source;
* ``profile``: ``--profile`` and ``--hot-loop``;
* ``session``: everything a run creates on the host, and its removal;
* ``stats``: percentiles and paired ratios.

It drives shmctx through its public API only.
"""
