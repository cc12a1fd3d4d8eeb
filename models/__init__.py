"""The Bayesian neural network: model, posterior state, the SVI step, predictive summaries, serialisation."""
