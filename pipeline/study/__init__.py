"""The depth study: the runner (``python -m pipeline.study``), the CPU demo, and the queries that read a study
back from MLflow (``runs``), which the report in ``monitoring/`` uses too.

Members train as their own processes (``pipeline/train.py``), so this package imports only ``core``,
``config`` and ``tracking``.
"""
