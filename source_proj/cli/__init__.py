"""The ``source-proj`` command line (``main``, ``commands``), the ``--task`` description of a run
(``task_spec``) and the digits demo (``demo``, ``digits_task``)."""
