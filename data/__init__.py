"""Recipes for local assets: the Pile-format corpus builder, the tiny Pythia-architecture model, the demo."""
