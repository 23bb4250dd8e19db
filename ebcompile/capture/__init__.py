"""Capture: the user's model as one graph (``torch.export`` first, ``symbolic_trace`` as the fallback), the pieces
an uncapturable model is cut into, and the tensor-type helpers the analyses share. Nothing here changes the model."""
