"""The matrix's ``slurm:`` section: what a site decides for every Slurm job of a matrix (partition,
account, time limit, GPUs per node, more #SBATCH lines, environment to export).

It lives in the spec so that a matrix file is checked whole before anything launches;
bench/launch/slurm/script.py renders it into a batch script.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SlurmOptions(BaseModel):
    """What a site decides for every job of a matrix (the matrix's ``slurm:`` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    partition: str | None = None
    account: str | None = None
    time_limit_s: int = Field(3600, ge=1, description="the job's wall-clock limit; Slurm rounds it up to minutes")
    gpus_per_node: int = Field(0, ge=0, description="GPUs asked per node (--gres=gpu:N); 0 on CPU")
    cpus_per_task: int | None = Field(None, ge=1)
    extra_sbatch: list[str] = Field(default_factory=list, description="more #SBATCH lines, e.g. '--qos=high'")
    env: dict[str, str] = Field(default_factory=dict, description="exported in the script, before srun")
    port_base: int = Field(20000, ge=1024, le=45000, description="rendezvous port = base + job id % 20000")

    @field_validator("extra_sbatch")
    @classmethod
    def _lines_are_options(cls, lines: list[str]) -> list[str]:
        for line in lines:
            text = line.removeprefix("#SBATCH").strip()
            if not text.startswith("-") or "\n" in text:
                raise ValueError(f"extra_sbatch line {line!r} is not one sbatch option. Fix: write it like '--qos=high'")
        return [line.removeprefix("#SBATCH").strip() for line in lines]

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        bad = [k for k in env if not _ENV_NAME.fullmatch(k)]
        if bad:
            raise ValueError(f"env names {bad} are not shell variable names. Fix: use letters, digits and _ only, "
                             "not starting with a digit")
        return env
