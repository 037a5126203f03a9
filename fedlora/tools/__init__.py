"""Tools for the person running experiments (``fedlora compare``, ``fedlora report``).

Kept out of the app bundle that ``flwr run`` ships to every node (see
pyproject's ``fab-include``): nodes never need them.
"""
