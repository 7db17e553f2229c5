"""The process and the job around it: nothing here knows about models or numerics.

dist.py         who this rank is (torchrun, srun, deepspeed, accelerate) and the process group
watchdog.py     heartbeats and a named verdict when a rank stops making progress
preemption.py   SIGTERM/SIGUSR1: checkpoint after the step, then exit
run_dir.py      one live job per run folder, and clean-up of a folder a failed start created
locks.py        file locks that survive a dead holder (cache preparation, run folders)
host_memory.py  host RSS, and giving freed memory back to the OS
process.py      environment set before the libraries read it, and an exit that skips gloo's teardown
"""
