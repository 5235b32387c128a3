"""Overrides that shrink a CPU config (configs/cpu/*) to a run of seconds, for the end-to-end tests."""

TINY = [
    "--data.batch_size=32",
    "--schedule.max_steps=10",
    "--schedule.unit=step",
    "--schedule.milestones=[]",
    "--schedule.warmup=0",
    "--log_every=2",
    "--progress=false",
]
