"""netsurv's tests.  A regular package, so that `tests.cluster` resolves here and not to a
top-level `tests` package some dependencies install into site-packages (rt-utils does)."""
