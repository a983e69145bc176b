"""Tensor and data parallelism: the process group (``parallel_state``), how the checkpoint and the
model are split across ranks (``sharding``, ``layers``), the processes of the ranks beyond 0
(``executor``) and engine replicas (``data_parallel``)."""
