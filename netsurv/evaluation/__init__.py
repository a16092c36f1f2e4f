"""Evaluation: the split loop over a cohort, with classical and deep split-fitters.

- :mod:`.runner`     ``run(cfg)``: stages -> splits -> per-split fit -> metrics and run outputs
                     (rank 0 writes; finished splits persisted and reused on a rerun)
- :mod:`.inputs`     modality tables (running the radiomics / pathomics stages), ComBat steps
- :mod:`.classical`  CoxNet / CoxPH pipelines, one split at a time
- :mod:`.deep`       Lightning training of MIL / tabular / fusion networks, one split at a time
- :mod:`.compare`    deep runs' classical baseline and the paired difference; null-model IBS
- :mod:`.records`    finished-split records (``<run>/splits/<split>.json``) and config hashes
"""
