"""netsurv: survival prediction from CT, WSIs and clinical data."""
__version__ = "0.1.0"

# the OmegaConf resolvers of configs/trainer (${netsurv.precision:...}, ${netsurv.num_nodes:}):
# registered on import, so that any netsurv entry point, test or tool can resolve a composed config
from netsurv.cluster import register_resolvers as _register_resolvers

_register_resolvers()
