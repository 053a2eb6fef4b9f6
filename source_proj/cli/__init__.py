"""The ``source-proj`` command line (``main``, ``commands``), the ``--task`` description of a run
(``task_spec``) and the digits demo (``demo``, ``digits_task``).

Layer: the top. It may import every other subpackage and none imports it (``import
source_proj`` never loads it), so the library works without the command line."""
