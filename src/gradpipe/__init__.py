"""gradpipe: per-sample backpropagation over Parquet on Ray.

The math lives in activations, losses, model, backprop and reduce (pure numpy); data and
outputs own Parquet; worker owns Ray; train runs the SGD loop; cli wires it to click.
"""

__version__ = "0.1.0"
