"""Depth-reduction strategies: the base every strategy shares and its registry, the baselines of the field, and
the ``NAME:key=value`` options every strategy is built from."""
