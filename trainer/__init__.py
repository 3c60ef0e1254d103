"""Training of batched lambda-ensembles with the modular loss."""
