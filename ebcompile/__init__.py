"""ebcompile: early-bird lottery tickets for Transformers, as compiler passes over torch.fx graphs."""

from .controller import EarlyBird
from .errors import EbcompileError
from .prepare import mask_nodes, prepare
from .ticket import Ticket, apply_ticket, snapshot

__all__ = ["prepare", "EarlyBird", "Ticket", "apply_ticket", "snapshot", "mask_nodes", "EbcompileError"]
__version__ = "0.1.0"
