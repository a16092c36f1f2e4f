"""Training of deep survival models (Lightning): :mod:`.bags` reads bags of tile embeddings
from the per-slide feature files on demand (netsurv, TRIDENT and CLAM layouts) and lists the
unusable slides; :mod:`.datamodule` builds the per-patient items (bag, tabular vectors after
the fitted feature steps, presence flags, time and event), padded multi-patient batches and
tile-budgeted evaluation batches; :mod:`.module` is the LightningModule (Cox partial likelihood
or discrete-time NLL, smoothed validation C-index, snapshot ensembles); :mod:`.ddp` holds the
multi-process pieces (Cox risk sets over the global batch, global batch samplers, unpadded
evaluation shards); :mod:`.offset` fits the classical pipeline as the network's fixed,
cross-fitted offset.
"""
