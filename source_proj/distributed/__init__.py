"""Runs spread over processes with ``torch.distributed`` (``torchrun``; gloo on CPUs, NCCL on
GPUs): who this process is and what it owns (``group``), sums that do not depend on the number
of processes (``reduce``), and failures that stop every rank (``failures``)."""
