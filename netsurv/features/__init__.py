"""Feature-table transformers, fitted on training rows only (scikit-learn API on DataFrames).

- :mod:`.clinical`   :class:`~.clinical.ClinicalEncoder`: impute, scale and one-hot the
                     clinical covariates
- :mod:`.tabular`    :class:`~.tabular.TableScaler`: median imputation and standardisation of
                     numeric tables
- :mod:`.select`     outcome-aware feature selection (invalid columns, correlation filter,
                     top-k univariate Cox)
- :mod:`.harmonize`  :class:`~.harmonize.ComBat` batch harmonisation (e.g. across CT scanners)
"""
