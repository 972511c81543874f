"""The stages of a run, one module each, all on one unit runner.

* :mod:`knowloc.pipeline.units`        ``run_units``: resume, progress, parts, consolidation,
                                       executor (local by default)
* :mod:`knowloc.pipeline.run`          what every stage reads from a run directory
* :mod:`knowloc.pipeline.localize`     screening and localization
* :mod:`knowloc.pipeline.consistency`  CS1/CS2, the K_I/K_II split, Table 1
* :mod:`knowloc.pipeline.modify`       knowledge modification (Tables 2, 3; CAS sets)
* :mod:`knowloc.pipeline.mapping`      query-KN mapping (Figure 4)
* :mod:`knowloc.pipeline.attention`    predominance, knowledge synapses, heatmaps (Figures 1,
                                       5, 6, 7, 10)

Stages compute and store tables; :mod:`knowloc.report` renders them.
"""
