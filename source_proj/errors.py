"""The root of the library's exceptions.

Every error the library raises on purpose (bad input, a store or trajectory that does not fit,
a budget that cannot be met, a failed rank) derives from :class:`SourceProjError`, so a program
can catch the library's verdicts without also catching bugs. The command line turns exactly
these (and operating-system errors such as a full disk) into a one-line message with exit
status 2; any other exception is a bug and keeps its traceback.

The subclasses live beside the code that raises them (``TrajectoryError`` in
``trajectory.checkpoints``, the store errors in ``features``, ...). Each also derives from the
built-in exception that describes it (``ValueError`` for bad input, ``RuntimeError`` for a run
that failed), so ``except ValueError`` in user code keeps working. This module imports nothing
from the package, so every subpackage may import it.
"""

from __future__ import annotations


class SourceProjError(Exception):
    """Root of every exception the library raises on purpose."""


class InputError(SourceProjError, ValueError):
    """An argument, a data row or a file's content that the library cannot use; the message
    names it."""
