"""Names of the built-in modalities, in one place.

A run's ``modalities`` list (``configs/train.yaml``) holds these names, and any other name
is a user feature table ``features/<name>.csv`` of the cohort folder.  Code that treats a
modality specially compares against the constants below instead of spelling the strings.
"""
from __future__ import annotations

CLINICAL = "clinical"      # clinical.csv, typed encoding (netsurv.features.clinical)
WSI = "wsi"                # bags of tile embeddings per patient: deep (MIL) models only
WSI_MASK = f"{WSI}_mask"   # batch key of the bags' padding mask (netsurv.training.datamodule)
EMBEDDINGS = "embeddings"  # mean tile embedding per patient: a feature table (the linear probe)
RADIOMICS = "radiomics"    # pyradiomics features from ct.csv (netsurv.tasks.radiomics)
PATHOMICS = "pathomics"    # nuclear morphology features from slides.csv (netsurv.tasks.pathomics)

BUILT_IN = (CLINICAL, WSI, EMBEDDINGS, RADIOMICS, PATHOMICS)


def tabular(modalities) -> list[str]:
    """The modalities that are tables (one row per patient), in their order.

    Parameters
    ----------
    modalities : iterable of str
        A run's modality names.

    Returns
    -------
    list of str
        Every name except :data:`WSI`, whose tile bags only a deep model can take.
    """
    return [m for m in modalities if m != WSI]
