"""Running a cell as a Slurm batch job, across nodes.

Rooms: ``script`` (the batch script of one cell: #SBATCH lines, environment, one `srun` starting the
cell's command on every node, and that command for `accelerate launch`), ``commands`` (sbatch, squeue,
scontrol, scancel, sacct), ``states`` (the job's end as bench sees it: state, status, failing node),
``job`` (SlurmJob: a submitted job that Ctrl-C or an exception cancels).

The cluster launcher, beside the local one in bench/launch/; of bench it imports only the matrix's
``slurm:`` section (bench/spec/slurm.py).
"""

from bench.launch.slurm.commands import SlurmError, cancel, job_info, node_hostnames, queue_state, submit
from bench.launch.slurm.job import JobEnd, SlurmJob
from bench.launch.slurm.script import (GPU_CAPABILITY_QUERY, NODE_FILE, SCRIPT_FILE, SlurmOptions,
                                       accelerate_node_command, arch_list_lines, render_batch_script, slurm_time,
                                       write_batch_script)
from bench.launch.slurm.states import (ACTIVE, BenchStatus, JobInfo, MemoryKill, NodeEnd, SrunError, bench_status,
                                       failed_nodes, memory_kills, read_node_ends, srun_errors)

__all__ = [
    "ACTIVE", "BenchStatus", "GPU_CAPABILITY_QUERY", "JobEnd", "JobInfo", "MemoryKill", "NODE_FILE", "NodeEnd",
    "SCRIPT_FILE", "SlurmError", "SlurmJob", "SlurmOptions", "SrunError", "accelerate_node_command", "arch_list_lines",
    "bench_status", "cancel", "failed_nodes", "job_info", "memory_kills", "node_hostnames", "queue_state",
    "read_node_ends", "render_batch_script", "slurm_time", "srun_errors", "submit", "write_batch_script",
]
