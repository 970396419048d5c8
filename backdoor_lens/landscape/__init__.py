"""Loss landscapes after Li et al., "Visualizing the Loss Landscape of Neural Nets" (NeurIPS 2018).

directions  Gaussian directions with filter / layer / weight normalisation, or towards a second model
evaluate    loss and accuracy at w + a*dx + b*dy on batches held in memory, several points per pass
schedule    grid points spread over MPI ranks (mpi4py), or one process without mpirun
store       the resumable HDF5 store (computed and diverged points apart), replaced atomically, locked per run
results     the store's tables and key numbers
The figures are drawn by backdoor_lens.plot.landscape.
"""
from backdoor_lens.landscape.directions import DirectionSettings, base_entries, difference_direction, fingerprint, \
    make_directions, normalize_direction, random_direction  # noqa: F401
from backdoor_lens.landscape.evaluate import GridEvaluator, load_batches, plain_pass  # noqa: F401
from backdoor_lens.landscape.schedule import evaluate_grid, get_comm, run_points  # noqa: F401
from backdoor_lens.landscape.store import LandscapeStore, held_store, landscape_settings  # noqa: F401
