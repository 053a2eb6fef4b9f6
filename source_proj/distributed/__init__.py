"""Runs spread over processes with ``torch.distributed`` (``torchrun``; gloo on CPUs, NCCL on
GPUs): who this process is and what it owns (``group``), sums that do not depend on the number
of processes (``reduce``), and failures that stop every rank (``failures``).

Layer: infrastructure, just above ``errors``: every pass may share its work through it, so it
imports nothing of the estimator or the store (the group lock of stores lives in
``features.locking``)."""
