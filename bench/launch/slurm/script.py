"""The batch script of one cell: `#SBATCH` lines, exported environment, and one `srun` that starts the
cell's command once per node.

Pure: ``render_batch_script`` returns text, ``write_batch_script`` puts it into the cell's folder, where a
user can `sbatch` it by hand. Each node's task runs inside ``bash -c '...'`` quoted so that every task
expands its own ``$SLURM_NODEID`` (the batch shell, which runs only on the first node, must not), and
leaves ``node-<node rank>.json`` in the folder with its host and exit code: ``srun``'s own exit code
says only that some task failed, not which.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from bench.spec.slurm import SlurmOptions  # the matrix's slurm: section, checked with the matrix

NODE_FILE = "node-{node_rank}.json"
SCRIPT_FILE = "slurm.sbatch"
# Variables the batch shell sets for every task (srun passes its environment on to the tasks).
MAIN_IP_VAR = "BENCH_MAIN_IP"
MAIN_PORT_VAR = "BENCH_MAIN_PORT"
# accelerate flags the multi-node rendering owns; a launch that brings its own would silently win
# (argparse keeps the last value), so they are refused.
OWNED_FLAGS = ("--num_machines", "--num_processes", "--machine_rank", "--main_process_ip", "--main_process_port",
               "--rdzv_backend", "--same_network", "--deepspeed_multinode_launcher")


def slurm_time(seconds: int) -> str:
    """Seconds as Slurm's D-HH:MM:SS."""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"


def accelerate_node_command(launcher: list[str], launch_args: list[str], nodes: int, procs_per_node: int) -> str:
    """One node's `accelerate launch`, as shell text for the per-task ``bash -c``.

    ``launcher`` is how accelerate is started (``[python, -m, accelerate.commands.launch]``),
    ``launch_args`` the rest of a one-node launch (config file, ``--multi_gpu``, the script and its
    arguments). Static rendezvous: node rank 0 hosts the store at the first host of the job and every
    node knows its rank up front (c10d rendezvous on a shared host has both nodes try to host it).
    ``--same_network`` makes accelerate hand torchrun a master address and port rather than a
    rendezvous endpoint. ``--deepspeed_multinode_launcher standard``: DeepSpeed cells too start through
    torchrun on each node (accelerate's default for several machines is DeepSpeed's pdsh launcher, which
    would ssh into the other nodes itself); accelerate reads the flag only for DeepSpeed.
    """
    owned = sorted({a.split("=")[0] for a in launch_args} & set(OWNED_FLAGS))
    if owned:
        raise ValueError(f"launch_args carry {owned}; the Slurm rendering sets them per node, leave them out")
    node_flags = [
        "--num_machines", str(nodes), "--num_processes", str(nodes * procs_per_node),
        "--rdzv_backend", "static", "--same_network", "--deepspeed_multinode_launcher", "standard",
    ]
    per_task = (f'--machine_rank "$SLURM_NODEID" --main_process_ip "${MAIN_IP_VAR}" '
                f'--main_process_port "${MAIN_PORT_VAR}"')
    return f"{shlex.join(launcher)} {shlex.join(node_flags)} {per_task} {shlex.join(launch_args)}"


# The compute capability of each GPU the node's task sees, one a line ("9.0").
GPU_CAPABILITY_QUERY = "nvidia-smi --query-gpu=compute_cap --format=csv,noheader"


def arch_list_lines(decide: str) -> list[str]:
    """Shell lines for a node's task that set TORCH_CUDA_ARCH_LIST from the node's own GPUs (DeepSpeed's JIT
    op builder cannot read some lists, bench/launch/cuda_arch.py). ``decide`` reads the capabilities on
    stdin and prints the value to export, or nothing to leave the variable as it is: which lists DeepSpeed
    parses is decided there, in one place, not in shell. Run on the node, since the GPUs are there."""
    return [f'arch_list="$({GPU_CAPABILITY_QUERY} 2>/dev/null | {decide})"',
            'if [ -n "$arch_list" ]; then export TORCH_CUDA_ARCH_LIST="$arch_list"; fi']


def _node_wrapper(node_command: str, folder: Path) -> str:
    """The task's shell text: run the node's command in a subshell (an `exit` in it ends only the command),
    then record host and exit code in its node file."""
    node_file = shlex.quote(str(folder)) + "/" + NODE_FILE.format(node_rank='"$SLURM_NODEID"')
    record = ("printf '{\"node_rank\": %d, \"node\": \"%s\", \"host\": \"%s\", \"exit_code\": %d}\\n' "
              f'"$SLURM_NODEID" "$SLURMD_NODENAME" "$(hostname)" "$rc" > {node_file}')
    return f"(\n{node_command}\n)\nrc=$?\n{record}\nexit $rc"


def render_batch_script(*, job_name: str, folder: Path, nodes: int, node_command: str,
                        options: SlurmOptions, workdir: Path | None = None) -> str:
    """The whole batch script. ``node_command`` is shell text run once on every node (by one task per
    node); it may use ``$SLURM_NODEID``, ``$BENCH_MAIN_IP`` and ``$BENCH_MAIN_PORT``."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    folder = folder.resolve()
    sbatch = [
        f"--job-name={job_name}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--time={slurm_time(options.time_limit_s)}",
        f"--output={folder}/slurm-%j.out",
        f"--error={folder}/slurm-%j.err",
        f"--chdir={(workdir or folder).resolve()}",
    ]
    if options.partition:
        sbatch.append(f"--partition={options.partition}")
    if options.account:
        sbatch.append(f"--account={options.account}")
    if options.gpus_per_node:
        sbatch.append(f"--gres=gpu:{options.gpus_per_node}")
    if options.cpus_per_task:
        sbatch.append(f"--cpus-per-task={options.cpus_per_task}")
    sbatch += options.extra_sbatch
    lines = ["#!/bin/bash", *(f"#SBATCH {shlex.quote(s) if ' ' in s else s}" for s in sbatch), ""]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(options.env.items())]
    lines += [
        "# The first host of the job hosts the rendezvous; the port follows the job id, so that two jobs",
        "# sharing a first node do not collide.",
        f'export {MAIN_IP_VAR}="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"export {MAIN_PORT_VAR}=$(( {options.port_base} + SLURM_JOB_ID % 20000 ))",
        f"rm -f {shlex.quote(str(folder))}/node-*.json",
        "# One task per node; --kill-on-bad-exit ends the others when one fails (else they would wait in a",
        "# collective for a peer that is gone). Each task's node file says which one failed.",
        f"srun --nodes={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "
        + shlex.quote(_node_wrapper(node_command, folder)),
        "",
    ]
    return "\n".join(lines)


def write_batch_script(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SCRIPT_FILE
    path.write_text(text)
    path.chmod(0o755)
    return path
