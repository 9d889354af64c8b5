"""Where a rank's start-up goes before the model is built: Python imports, timed in fresh interpreters.

A cell's record splits its start-up (``startup_breakdown``); on the GPU machines most of it is imports
(``interpreter_and_torch_s``, ``model_code_imports_s``), not the model build. This runs each group of imports a
worker does in a fresh ``python -X importtime`` (so nothing is cached in the process; files the OS has cached
stay cached, as for the second cell of a matrix), with the launch environment bench gives a cell, and writes
the wall time of each group and the slowest modules (self time) to OUT/import_time.json.

    python benchmarks/import_time.py --out DIR [--repeats 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# What a worker imports, in its order; each group is timed on top of the ones before it.
GROUPS = {
    "torch": "import torch",
    "accelerate": "import accelerate",
    "transformers_llama": ("from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING\n"
                           "from transformers import LlamaConfig\n"
                           "MODEL_FOR_CAUSAL_LM_MAPPING[LlamaConfig]"),
    "peft": "import peft",
    "deepspeed": "import deepspeed",
    "bitsandbytes": "import bitsandbytes",
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def time_group(before: list[str], code: str) -> dict:
    """Wall seconds of `code` after the `before` imports, in a fresh interpreter, and its slowest modules."""
    script = "\n".join(before) + "\nimport time, sys\nt = time.perf_counter()\nprint('@@mark', file=sys.stderr)\n" \
        + code + "\nprint('@@took', time.perf_counter() - t, file=sys.stderr)\n"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", script], capture_output=True, text=True,
                          check=False, env={**os.environ, **OFFLINE}, timeout=600)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    lines = proc.stderr.splitlines()
    after_mark = lines[lines.index("@@mark") + 1:]
    took = next(float(line.split()[1]) for line in after_mark if line.startswith("@@took"))
    modules = []
    for line in after_mark:  # "import time:   self [us] | cumulative | imported package"
        if line.startswith("import time:") and "self [us]" not in line:
            self_us, cumulative_us, name = (part.strip() for part in line[len("import time:"):].split("|"))
            modules.append((int(self_us), int(cumulative_us), name))
    slowest = sorted(modules, reverse=True)[:15]
    return {"wall_s": took, "modules": len(modules),
            "slowest_self_s": [{"module": n, "self_s": s / 1e6, "cumulative_s": c / 1e6} for s, c, n in slowest]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=2, help="fresh interpreters per group")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result = {"python": sys.version.split()[0], "repeats": args.repeats, "groups": {}}
    before: list[str] = []
    for name, code in GROUPS.items():
        runs = [time_group(before, code) for _ in range(args.repeats)]
        failed = [r for r in runs if "error" in r]
        walls = [r["wall_s"] for r in runs if "wall_s" in r]
        result["groups"][name] = {"wall_s": walls, "median_s": statistics.median(walls) if walls else None,
                                  "last_run": (failed or runs)[-1]}  # a failure's error, else the modules
        print(f"{name:20s} " + " ".join(f"{w:6.2f}" for w in walls) + " s", flush=True)
        before.append(code)
    result["total_s"] = time.time() - started
    (args.out / "import_time.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
