"""Survival models.

- :mod:`.classical`: the classical pipeline. It runs per-split feature steps (clinical
  encoding, then per feature table: invalid columns, imputation, optional ComBat, scaling and the
  correlation filter), top-k univariate-Cox selection and a Cox model (CoxNet or CoxPH), with its
  inner grid search.
- :mod:`.mil`: multiple-instance encoders over bags of tile embeddings (``ABMIL``,
  ``TransMIL`` with Nyström attention, ``MeanPoolMIL``, ``MaxPoolMIL``).
- :mod:`.fusion`: tabular MLP branches, the multimodal fusions (early, late, bilinear and
  gated-attention) and ``SurvivalNet``, which ties branches, fusion, head and the optional
  classical offset together.
"""
