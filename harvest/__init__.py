"""Harvest stage: model + forward hooks -> sharded, compressed zarr activation store (the contract), and its reader."""
