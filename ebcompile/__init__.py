"""ebcompile: early-bird lottery tickets for Transformers, as compiler passes over torch.fx graphs."""

from .analysis.analyse import Analysis, analyse
from .errors import EbcompileError
from .export import export_onnx
from .persist.checkpoint import load, save
from .prepare import mask_nodes, prepare
from .report import report
from .search.controller import EarlyBird
from .search.distributed import full_state_dict
from .search.gates import add_gate_penalty_grad, gate_parameters, gate_penalty
from .search.ticket import Ticket, apply_ticket, draw_ticket, snapshot
from .serving import save_for_serving
from .transforms.shrink import compact

__all__ = ["prepare", "analyse", "Analysis", "EarlyBird", "Ticket", "apply_ticket", "draw_ticket", "snapshot", "compact", "export_onnx",
           "report", "mask_nodes", "save", "load", "EbcompileError", "gate_penalty", "add_gate_penalty_grad",
           "gate_parameters", "save_for_serving", "full_state_dict"]
__version__ = "0.1.0"
