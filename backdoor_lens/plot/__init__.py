"""Drawing helpers: matplotlib set-up and the landscape's figures. Nothing here computes results."""
