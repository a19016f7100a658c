"""The long-lived tilerun service: a task store, an engine actor, the commands, and what people
watch (the status page and Ray metrics).

``store`` keeps every task in SQLite (the truth); ``engine_actor`` runs the step loop on Ray;
``head`` starts and stops the Ray head that ``tilerun up`` owns; ``client`` is the Python API the
commands and scripts use; ``commands`` is the command line; ``status_page`` and ``metrics`` show
the engine's ``snapshot()``.
"""
