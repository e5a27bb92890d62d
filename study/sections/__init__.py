"""The lab bench: one module per notebook, the only code that takes a :class:`~study.context.Context`.

=========================  ==========================  ===========================================
notebook                   section module              methods it drives
=========================  ==========================  ===========================================
``00_baselines``           :mod:`.baselines`           :mod:`study.train`, :mod:`study.models`
``01_distillation``        :mod:`.distillation`        :mod:`study.distill`
``02_structured_pruning``  :mod:`.structured_pruning`  :mod:`study.prune` (+ :mod:`.measure`)
``03_head_pruning``        :mod:`.head_pruning`        :mod:`study.prune` (heads)
``04_iterative_pruning``   :mod:`.iterative_pruning`   :func:`study.prune.prune_iteratively`
``05_quantization``        :mod:`.quantization`        :mod:`study.quant`
``06_bilevel_search``      :mod:`.bilevel_search`      :mod:`study.bilevel`
``07_deployment``          :mod:`.deployment`          :mod:`study.bench` (remote runner)
=========================  ==========================  ===========================================

:mod:`.common` holds what several sections share: loaders, the cached baseline models,
recovery fine-tuning, the one table-row builder and :func:`.common.cached`, whose cache
keys are derived from the import closure of the calling section module (so editing any
method a result depends on invalidates it).
"""
