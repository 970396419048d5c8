"""The pure math: hooks and activation statistics, embeddings, Hessian, Lipschitz, metrics, feature synthesis, detectors. Nothing here draws, parses flags or writes files."""
