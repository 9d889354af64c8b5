"""What CPU figures mean, said wherever they are shown (the run's console summary, the report's top)."""

# CPU speedups and efficiencies look like findings and are not.
CPU_CAVEAT = ("CPU cells show that the path works, not how strategies compare: processes share this machine's "
              "cores, so speedups and efficiencies measure the harness. Compare strategies on GPU runs.")
