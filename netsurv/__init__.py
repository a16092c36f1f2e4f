"""netsurv: survival prediction from CT, WSIs and clinical data."""
__version__ = "0.1.0"
