"""featurecache: cache frozen-base activations per layer in HDF5, train cheap heads, find the best layer.

Importing the package is cheap (numpy only); torch is imported by the functions that need it.
"""

from featurecache.errors import FeaturecacheError
from featurecache.store import iter_feature_chunks, load_features, read_metadata

__version__ = "0.1.0"

__all__ = ["FeaturecacheError", "__version__", "iter_feature_chunks", "load_features", "read_metadata"]
