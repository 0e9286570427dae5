"""State of the node: one database row per study, series, instance and job.

The database is the one record of progress: every stage reads its work from here
and records each state change here (see :mod:`db.jobs`).
"""
