"""The parts the trainer drives each step, each from its own config section: the DeepSpeed engine, the learning
rate schedule, metric reduction, the paper's diagnostics, the progress display and the start-up checks.
Imports ``core``, ``config``, ``models`` and the components (``data``, ``checkpoint``, ``tracking``), never the
entry points above it.
"""
