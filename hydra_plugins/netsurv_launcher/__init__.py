"""netsurv's Hydra launcher plugin (Hydra instantiates launchers only from ``hydra_plugins``)."""
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SlurmLauncher

from netsurv.cluster import SweepJobsMixin


class SlurmLauncher(SweepJobsMixin, _SlurmLauncher):
    """``hydra/launcher=slurm``: Hydra's submitit SLURM launcher whose failed jobs exit
    non-zero with their traceback in the job log, whose sweeps collect every job (the results
    table lists the failed ones) and whose resources are checked against the trainer."""
