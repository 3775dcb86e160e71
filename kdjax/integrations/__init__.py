"""Adapters that make kdjax's losses the loss of other people's trainers.

Each submodule is a thin layer over kdjax's public API for one trainer, needs that trainer
installed (an extra of its own, for example ``pip install "kdjax[tunix]"``), and is never
imported by ``kdjax`` itself: ``import kdjax.integrations.tunix``.
"""
