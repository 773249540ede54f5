"""Past one machine: a finite archive judged by a Ray Data job (``devrecd batch``).

The job calls the same stages as the daemon (:mod:`devrecd.stages` for read + hash + decode +
features and failure reasons, :mod:`devrecd.backends` for inference, :mod:`devrecd.pipeline.verdict`
for the records) and writes an output folder that is exactly-once across restarts
(:mod:`devrecd.cluster.output`). Ray is imported only inside :mod:`devrecd.cluster.job` and
:mod:`devrecd.cluster.stages` functions, never by serving.
"""
