"""Infrastructure that knows nothing of training: the user-error type, retries, storage, process groups and the
stop/requeue contract with the launch scripts. Imports no other package of ``pipeline``.

* ``errors``: ``UserError``, the base of every error a user can fix, carrying the exit code (and ``ConfigError``);
* ``retry``: the one retry policy (backoff, deadline, stop check);
* ``storage``: one storage layer for local paths, ``file://`` and ``s3://`` (``s3``: its S3 side);
* ``s3``: the s3fs filesystem behind ``storage`` on ``s3://``, and the kinds of failure its client stack raises;
* ``distributed``: the torchrun environment, process-group start, broadcast, gather, barrier, reductions;
* ``stop``: stop signals as a flag read at step boundaries, and the stop record the batch script reads.
"""
