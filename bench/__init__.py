"""bench: how each way of spreading LLM training over GPUs performs, and what it costs.

One package per concern, imports flowing one way (pyproject.toml's import-linter contracts check it):

    cli                      the `bench` command
    check                    baselines and the nightly gate
    report | launch          records -> tables, plots, verdict | a matrix's cells launched, records written
    estimate | worker        memory predicted before launch | the code inside each rank
    records | machine        the record schema and its files | NVML, the environment fingerprint
    strategies               strategies as degrees, their registry, users' configs, renderers, precision, what can run where
    spec                     the matrix schema, its expansion, the models and data it names

The README's "Architecture" section follows one cell through them.
"""
