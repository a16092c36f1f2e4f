"""CT stage: volumes and masks in, pyradiomics feature table out."""
