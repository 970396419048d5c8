"""Loss landscapes after Li et al., "Visualizing the Loss Landscape of Neural Nets" (NeurIPS 2018).

directions  Gaussian directions with filter / layer / weight normalisation, or towards a second model
evaluate    loss and accuracy at w + a*dx + b*dy on batches held in memory, several points per pass
schedule    grid points spread over MPI ranks (mpi4py), or one process without mpirun
store       the resumable HDF5 store (computed and diverged points apart), replaced atomically, locked per run
plots       contour, heat map, 3-D surface, 1-D curve
"""
from .directions import base_entries, difference_direction, fingerprint, make_directions, normalize_direction, \
    random_direction  # noqa: F401
from .evaluate import GridEvaluator, load_batches, plain_pass  # noqa: F401
from .schedule import get_comm, run_points  # noqa: F401
from .store import LandscapeStore  # noqa: F401
